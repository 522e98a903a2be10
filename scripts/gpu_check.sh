#!/usr/bin/env bash
# The GPU acceptance run, on one NVIDIA GPU, within about 8 minutes: the `gpu`-marked tests (bf16
# autocast, channels_last, torch.compile, fused Adam, the CUDA-graph sampler, NCCL DDP in one process,
# evaluation on the GPU), then the train and sample benchmarks for EDM2 XS at 64x64 in bf16 (with
# MFU) and for the default shape, writing JSON under reports/bench/ with the device name.
#   scripts/gpu_check.sh            # run it (needs .venv: `make setup`)
#   scripts/gpu_check.sh --dry-run  # print what it would run (CI runs this)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
steps=(
  "$PY -m pytest -q -m gpu tests/test_gpu.py"
  "$PY -m benchmarks.train --device cuda --amp --channels-last --compile --shapes small xs64 --steps 10"
  "$PY -m benchmarks.sample --device cuda --amp --compile --shapes small xs64"
)
if [ "${1:-}" = "--dry-run" ]; then
  printf '%s\n' "${steps[@]}"
  exit 0
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible to torch')"
for s in "${steps[@]}"; do
  echo "+ $s"
  timeout 480 $s
done
echo "gpu_check: done; results in reports/bench/*-$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0).split()[-1].lower())').json"
