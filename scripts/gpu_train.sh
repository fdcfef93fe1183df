#!/usr/bin/env bash
# The native-resolution recipe of the shipped weights on one GPU, in two halves.
#
# Here (packs what the GPU machine lacks into .gpu/, git-ignored: the training and validation
# slices at 8 bits, the split, and wheels of the pure-Python packages lungnlb needs beyond torch,
# numpy, scipy and scikit-image):
#     bash scripts/gpu_train.sh pack STUDIES SPLIT.json
# On the GPU machine (the device tool: carry .gpu; the run's folder comes back under $OUT):
#     bash scripts/gpu_train.sh train [BUDGET_S]
# (A dry run here: PYTHON=.venv/bin/python DEVICE=cpu bash scripts/gpu_train.sh train 30.)
# Then, here on the full-precision studies folder, fit its slice probe (the packed data has no JPEG
# tumours: python -m experiments.jpeg_encoder_probe --checkpoint ... --write) and evaluate it (docs/training.md).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES="monai==1.6.1 nibabel==5.4.2 pydicom==2.4.5 pynrrd==1.1.3"  # the versions setup.sh installs here

pack() {
    local studies=$1 split=$2
    rm -rf .gpu && mkdir -p .gpu
    .venv/bin/python -m experiments.compact_studies "$studies" .gpu/studies --split "$split" --subsets train val --native-patches --slice-step 2
    cp "$split" .gpu/split.json
    .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .gpu/wheels $PACKAGES
    carried_size
}

carried_size() {  # a device call carries the working tree git sees and .gpu, 64 MiB in all
    .venv/bin/python - <<'EOF'
import subprocess, sys
from pathlib import Path
listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        capture_output=True, check=True).stdout.split(b"\0")
files = [Path(name.decode()) for name in listed if name] + list(Path(".gpu").rglob("*"))
size = sum(path.stat().st_size for path in files if path.is_file())
print(f"a device call would carry {size / 2**20:.1f} MiB (the repository and .gpu) of its 64 MiB")
if size > 64 * 2**20:
    sys.exit("too much to carry: pack with a larger --slice-step (experiments/compact_studies.py)")
EOF
}

train() {
    local budget=${1:-420} out=${OUT:-runs/gpu} python=${PYTHON:-python3} device=${DEVICE:-cuda}
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl
    export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
    "$python" -m lungnlb.cli train --data .gpu/studies --split .gpu/split.json --out "$out/run" \
        --model unet_sl_nlb --model-kwargs '{"grid": 4}' --patch-size 64 --steps 40000 --batch-size 128 \
        --lr 2e-3 --seg-fraction 0.7 --no-balance-classes --val-every 5000 --val-slices 400 \
        --num-workers 12 --device "$device" --time-budget-s "$budget" --no-slice-probe 2>&1 | tee "$out/train.log"
}

case "${1:-}" in
    pack) shift; pack "$@" ;;
    train) shift; train "$@" ;;
    *) echo "usage: $0 pack STUDIES SPLIT.json | train [BUDGET_S]" >&2; exit 2 ;;
esac
