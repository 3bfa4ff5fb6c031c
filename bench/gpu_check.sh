#!/usr/bin/env bash
# GPU evidence in one command, no DALI (the GPU machine cannot have it), under 8 minutes on an H100/H200:
#   1. tests on CUDA: the CuPy kernel against the torch reference (and the same source built on the host), the
#      cut, the stage, the tensor backend, the drop-in loader and a trainer epoch on the device against the CPU
#      (tests/test_device.py), Grad-CAM;
#   2. benchmarks: the cut stage (fused kernel vs torch reference vs a normalise pass), Grad-CAM, and ResNet-50
#      AMP training-step images/s at batch 256 (no stage, Cutout, Gutout);
#   3. one epoch of a K = 2 peer-Gutout ensemble on Fashion-MNIST, AMP, tensor backend;
#   4. the study's comparison at a scale the CPU cannot reach: the full Fashion-MNIST training set (5,000 held out
#      for validation), ResNet-20, Cutout side 1/4 as the reference, K = 1; every (arm, seed) its own process on
#      the one GPU, all at once, each cut off after $STUDY_SECONDS; then one `gutout compare` writes the table of
#      the runs that finished (it starts none), and keeps their final records (`compare --records`) in one archive.
# Results go to $OUT (or runs/gpu-check): 8 files. Fashion-MNIST is read from .data/fashion-mnist when present
# (carry the Debian files there), else from the usual places.
# `--dry-run` runs the very same steps on the CPU at tiny sizes, on a generated stand-in for Fashion-MNIST.
#
#   bash bench/gpu_check.sh            # on a CUDA machine
#   bash bench/gpu_check.sh --dry-run  # anywhere
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-check}
mkdir -p "$OUT"
DRY=0
ONLY=${ONLY:-all}  # ONLY=tests runs the tests alone
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}

# The installed layout (gutout, gutout.pipelines, gutout.train) without installing anything: a staging
# folder with the package, the tests and the benchmarks, run from there (so the repository's own gutout/
# folder, which lacks the two sub-packages, is never on the path).
OUT=$(cd "$OUT" && pwd)
STAGE=$(mktemp -d)
mkdir -p "$STAGE/gutout"
cp -r gutout/. "$STAGE/gutout/"
cp -r pipelines "$STAGE/gutout/pipelines"
cp -r train "$STAGE/gutout/train"
cp -r tests bench pyproject.toml "$STAGE/"
[ -d .whl ] && cp -r .whl "$STAGE/"
DATA_ARGS=()
[ -d .data/fashion-mnist ] && DATA_ARGS=(--data "$PWD/.data/fashion-mnist")
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=$PWD/.venv/bin/python
cd "$STAGE"
export PYTHONPATH="$STAGE${PYTHONPATH:+:$PYTHONPATH}"
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

compare_results() {  # keep only the table and the figure of a comparison under $OUT
  cp "$1/results.md" "$OUT/compare-results.md" 2>/dev/null
  cp "$1/results.png" "$OUT/compare-results.png" 2>/dev/null
}

# One sequence of steps; the dry run only changes the device and the sizes.
if [ $DRY = 1 ]; then
  DEVICE=cpu
  $PY -c "from pathlib import Path; from tests.conftest import fake_fashion_mnist; fake_fashion_mnist(Path('fake'))"
  DATA_ARGS=(--data fake)
  STAGE_ARGS=(--batches 4 --size 32 --repeats 1)
  GRADCAM_ARGS=(--models resnet18 --batch 2 --size 64 --repeats 1)
  STEP_ARGS=(--model resnet18 --batch 4 --size 64 --steps 1 --blocks 1)
  TRAIN_ARGS=(--subset 128 --batch-size 32)
  STUDY_ARMS=none,gutout-threshold
  STUDY_SEEDS=1
  STUDY_ARGS=(--epochs 1 --subset 64 --val-split 64 --batch-size 32)
  STUDY_REFERENCE=none
else
  DEVICE=cuda
  STAGE_ARGS=(--repeats 50)
  GRADCAM_ARGS=(--repeats 20)
  STEP_ARGS=()
  TRAIN_ARGS=()
  # The CPU study's arms (docs/regime-screen.md chose the model and the reference), 5 x 3 = 15 processes.
  STUDY_ARMS=none,cutout-0.25,keep-0.25,gutout-threshold,gutout-sigma
  STUDY_SEEDS=3
  STUDY_ARGS=(--model resnet20 --epochs 10)
  STUDY_REFERENCE=cutout-0.25
fi
step tests env GUTOUT_TEST_DEVICE=$DEVICE $PY -m pytest -q -rs tests/test_kernels.py tests/test_device.py \
  tests/test_cut.py tests/test_gradcam.py
[ "$ONLY" = tests ] && { echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED)"; exit $status; }
step benches sh -c "$PY bench/stage.py --device $DEVICE ${STAGE_ARGS[*]} && \
  { [ $DEVICE = cpu ] || $PY bench/stage.py --device cuda ${STAGE_ARGS[*]} --dtype float16; } && \
  $PY bench/gradcam.py --device $DEVICE ${GRADCAM_ARGS[*]} && $PY bench/train_step.py --device $DEVICE ${STEP_ARGS[*]}"
step train $PY -m gutout.train.cli train fashion-mnist "${DATA_ARGS[@]}" --ensemble 2 --epochs 1 --device $DEVICE \
  --backend tensor --wandb disabled --out train --no-progress "${TRAIN_ARGS[@]}"
study() {  # every (arm, seed) at once, one process each, then the table of those that finished
  local pids=() arm seed failed=0
  for seed in $(seq 0 $((STUDY_SEEDS - 1))); do
    for arm in ${STUDY_ARMS//,/ }; do
      timeout "${STUDY_SECONDS:-300}" $PY -m gutout.train.cli compare fashion-mnist "${DATA_ARGS[@]}" \
        --device $DEVICE --backend tensor --out compare --no-progress --runs "$arm" --seeds "$seed-$seed" \
        "${STUDY_ARGS[@]}" >"compare-$arm-$seed.log" 2>&1 &
      pids+=($!)
    done
  done
  for pid in "${pids[@]}"; do wait "$pid" || failed=$((failed + 1)); done
  for log in compare-*.log; do echo "--- $log"; tail -n 2 "$log"; done
  echo "$((${#pids[@]} - failed)) of ${#pids[@]} runs finished in time"
  $PY -m gutout.train.cli compare fashion-mnist "${DATA_ARGS[@]}" --device $DEVICE --backend tensor --out compare \
    --no-progress --runs "$STUDY_ARMS" --seeds "$STUDY_SEEDS" --reference "$STUDY_REFERENCE" --time-budget 0 \
    --records records "${STUDY_ARGS[@]}"
  # Each finished run's config and final record (a few KB each), one file: `tar xzf` it into a --records folder.
  tar czf "$OUT/study-records.tgz" records
}
step compare study
compare_results compare
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED); results in $OUT"
exit $status
