#!/usr/bin/env bash
# Set up .venv with LungNLB, the MONAI Label app and the test tools. Safe to rerun.
# torch is installed first at the verified version (served from local disk here; a bare
# `pip install torch` would fetch a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/pip install -q -e ".[app,test,slicer]"
