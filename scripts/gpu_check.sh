#!/usr/bin/env bash
# The GPU acceptance run, in one call on an air-gapped GPU node (docs/performance.md: GPU acceptance). Steps, each
# with its own time budget (scripts/gpu_env.py steps(); at most 385 s in all), continuing after a failed
# step: the `gpu` tests (bf16, channels_last, torch.compile, fused Adam, CUDA-graph sampler) 60 s; a bf16
# matmul peak 20 s; training throughput and MFU for EDM2 XS at 64x64 in bf16 with compile, channels_last
# and fused Adam 130 s; the sampler eager / compiled / CUDA graphs 110 s; evaluation
# on the device against the CPU 35 s; NCCL DDP in one process 30 s. Writes gpu_check-<step>.json per step
# and gpu_check.log into ${OUT:-reports/bench}.
#   scripts/gpu_check.sh              # on the GPU node: .venv if present, else python3 + gpu-bundle/ offline
#   scripts/gpu_check.sh --rehearse   # here, on the CPU: a fresh venv with only the node's packages, the
#                                     # bundle offline, every step at the smallest shapes (CI runs it)
#   scripts/gpu_check.sh --dry-run    # print the steps and their budgets
set -uo pipefail
cd "$(dirname "$0")/.."
mode=run
case "${1:-}" in
  "") ;;
  --rehearse) mode=rehearse ;;
  --dry-run) mode=dry ;;
  *) echo "gpu_check: unknown argument ${1} (use --rehearse or --dry-run)" >&2; exit 2 ;;
esac
HOST_PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ $mode = dry ]; then
  exec "$HOST_PY" scripts/gpu_env.py check --python "$HOST_PY" --out "${OUT:-reports/bench}" --dry-run
fi
if [ $mode = rehearse ]; then
  OUT=${OUT:-$(mktemp -d /tmp/gpu-rehearse-out.XXXXXX)}
  "$HOST_PY" scripts/gpu_env.py rehearse-venv .gpu-rehearse || exit 1
  PY=.gpu-rehearse/bin/python
  for blocked in ray mlflow dvc submitit cleanfid optuna pydantic; do   # the node has none of these
    if "$PY" -c "import $blocked" 2>/dev/null; then echo "gpu_check: rehearsal venv has $blocked" >&2; exit 1; fi
  done
else
  OUT=${OUT:-reports/bench}
  PY=$HOST_PY
fi
if ! "$PY" -c "import pydantic" 2>/dev/null; then          # the node: install the bundle offline, throw-away
  if [ ! -f gpu-bundle/requirements.txt ]; then
    echo "gpu_check: $PY lacks pydantic and there is no gpu-bundle/: run scripts/gpu_bundle.sh where pip reaches an index, then carry gpu-bundle/" >&2
    exit 2
  fi
  SITE=$(mktemp -d /tmp/gpu-check-site.XXXXXX)
  "$PY" scripts/gpu_env.py install --bundle gpu-bundle --target "$SITE" || exit 1
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
  echo "gpu_check: installed gpu-bundle/ offline into $SITE"
fi
if [ $mode = run ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device visible to torch (use --rehearse on a CPU)')" || exit 2
fi
exec "$PY" scripts/gpu_env.py check --python "$PY" --out "$OUT" $( [ $mode = rehearse ] && echo --rehearse )
