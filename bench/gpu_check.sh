#!/usr/bin/env bash
# GPU evidence in one command, no DALI (the GPU machine cannot have it):
#   - the CuPy-vs-torch cut equality tests and the Grad-CAM tests on CUDA,
#   - the cut-stage benchmark (fused kernel vs torch reference vs a plain normalise pass),
#   - the Grad-CAM benchmark (ours vs plain forward vs pytorch-grad-cam).
# Results go to $OUT (or runs/gpu-check). `--dry-run` runs the same steps on the CPU at tiny sizes.
#
#   bash bench/gpu_check.sh            # on a CUDA machine
#   bash bench/gpu_check.sh --dry-run  # anywhere
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python

# The installed layout (gutout, gutout.pipelines, gutout.train) without installing anything.
STAGE=$(mktemp -d)
mkdir -p "$STAGE/gutout"
cp -r gutout/. "$STAGE/gutout/"
cp -r pipelines "$STAGE/gutout/pipelines"
cp -r train "$STAGE/gutout/train"
export PYTHONPATH="$STAGE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! $PY -c "import pytorch_grad_cam" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$STAGE/site" .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:$STAGE/site"
fi
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME CMD...: run, show, keep the output under $OUT
  local name=$1
  shift
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "=== $name FAILED (exit $rc)"; status=1; }
}

{
  date -u
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
  $PY -c "import cupy; print('cupy', cupy.__version__)" 2>&1 | tail -1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
} | tee "$OUT/env.txt"

if [ $DRY = 1 ]; then
  step tests $PY -m pytest -q -x tests/test_kernels.py tests/test_cut.py
  step stage-bench $PY bench/stage.py --device cpu --batches 4 --size 32 --repeats 1
  step gradcam-bench $PY bench/gradcam.py --device cpu --models resnet18 --batch 2 --size 64 --repeats 1
else
  step tests $PY -m pytest -q -rs tests/test_kernels.py tests/test_gradcam.py tests/test_cut.py
  step stage-bench sh -c "$PY bench/stage.py --device cuda --repeats 50 && \
    $PY bench/stage.py --device cuda --repeats 50 --dtype float16"
  step gradcam-bench $PY bench/gradcam.py --device cuda --repeats 20
fi
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED); results in $OUT"
exit $status
