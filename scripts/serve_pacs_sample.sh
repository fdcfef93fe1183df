#!/usr/bin/env bash
# Try the app with a PACS: a local Orthanc (DICOMweb, 127.0.0.1 only) holding the bundled sample's CT
# series as DICOM with its original label as a DICOM SEG, and the app served on Orthanc's DICOMweb URL.
#
#   bash scripts/serve_pacs_sample.sh [extra monailabel start_server arguments]
#
# Orthanc: http://127.0.0.1:${PACS_PORT:-8042}/ (its database in runs/pacs_sample/orthanc); the app:
# http://127.0.0.1:8000/ as with serve_sample.sh (`--port` changes it). Labels submitted from 3D Slicer
# go to Orthanc as new DICOM SEG series. Ctrl-C stops both. A real PACS: see README, "With your PACS".
set -euo pipefail
cd "$(dirname "$0")/.."

[ "${LUNGNLB_SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
run=runs/pacs_sample
[ -d "$run/dicom" ] || python scripts/pacs_sample_dicom.py sample_data/studies "$run/dicom"

fifo="$(mktemp -u)"
mkfifo "$fifo"
exec 3<> "$fifo"  # Orthanc's READY line comes through this pipe; it stays open (and drained) while it runs
python scripts/pacs_orthanc.py --storage "$run/orthanc" --port "${PACS_PORT:-8042}" --upload "$run/dicom" >&3 &
orthanc=$!
trap 'kill "$orthanc" 2>/dev/null || true; wait "$orthanc" 2>/dev/null || true; rm -f "$fifo"' EXIT
url=""
while :; do
    if read -r -t 5 line <&3; then
        echo "$line"
        case "$line" in "ORTHANC READY "*) url="${line#ORTHANC READY }"; break ;; esac
    else
        kill -0 "$orthanc" 2>/dev/null || break
    fi
done
[ -n "$url" ] || { echo "serve_pacs_sample.sh: Orthanc did not start" >&2; exit 1; }
cat <&3 >/dev/null &

export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"
monailabel start_server --app apps/lungnlb --studies "$url" --host 127.0.0.1 --conf models all \
    --conf pacs_cache "$run/cache" "$@"
