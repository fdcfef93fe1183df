#!/usr/bin/env bash
# The main job: set up, then serve the NLB U-Net as a MONAI Label app on the bundled sample studies.
# The server writes into its studies folder (datastore, final labels), so it works on a copy in runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
studies=runs/sample_studies
[ -d "$studies" ] || { mkdir -p runs && cp -r sample_data/studies "$studies"; }
# monailabel's launcher runs the first `python` on PATH: make it the venv's.
export PATH="$PWD/.venv/bin:$PATH"
# huge pages for torch's large CPU tensors (lungnlb/runtime.py): ~30% faster 512 x 512 inference
export THP_MEM_ALLOC_ENABLE="${THP_MEM_ALLOC_ENABLE:-1}"
exec monailabel start_server --app apps/lungnlb --studies "$studies" --conf models all "$@"
