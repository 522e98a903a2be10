#!/usr/bin/env bash
# Build gpu-bundle/: the wheels the GPU acceptance run (scripts/gpu_check.sh) needs on an air-gapped GPU
# node that already has Python 3.12 + PyTorch and the packages in scripts/gpu_env.py PREINSTALLED, but
# not pydantic. Run it where pip reaches a package index (here, CI, a login node); nothing large goes
# in: no torch, no Inception weights. The bundle is git-ignored and at most 10 MiB.
#   scripts/gpu_bundle.sh                       # wheels for the node (CPython 3.12, manylinux x86-64)
#   GPU_PYTHON=3.11 scripts/gpu_bundle.sh       # another node Python
# The wheels for this machine's own Python are added too (when it differs), so that
# `scripts/gpu_check.sh --rehearse` can install the same bundle offline here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$PY" scripts/gpu_env.py bundle --out gpu-bundle --python-version "${GPU_PYTHON:-3.12}" "$@"
