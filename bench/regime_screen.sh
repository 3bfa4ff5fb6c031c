#!/usr/bin/env bash
# The regime screen: where does Cutout beat no erasing on Fashion-MNIST, on the CPU?
#
# Each cell is one `gutout compare` (K = 1, 3 paired seeds, 5,000 stratified validation samples held out of the
# training set, chosen on validation; paired differences to `none`). Cells run one after another, cheapest
# first, each into its own folder under $OUT; finished runs are not repeated, so the script resumes where it
# stopped. docs/regime-screen.md reports the outcome.
#
#   bash bench/regime_screen.sh             # all cells
#   CELLS="small-5k-30" bash bench/regime_screen.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/screen}
GUTOUT=${GUTOUT:-.venv/bin/gutout}
SEEDS=${SEEDS:-3}
COMMON=(--seeds "$SEEDS" --reference none --eval-batch-size 256 --device cpu --no-progress)

declare -A CELL=(
  # ResNet-8 (small-resnet), 5,000 training samples, 30 epochs annealed to zero: Cutout at two sides and
  # Random Erasing at its defaults.
  [small-5k-30]="--model small-resnet --subset 5000 --epochs 30 --runs none,cutout-0.25,cutout,random-erasing"
  # ResNet-20 (three blocks per stage: three times the depth of ResNet-8) on the same data and schedule.
  [resnet20-5k-30]="--model resnet20 --subset 5000 --epochs 30 --runs none,cutout-0.25,cutout"
  # A fifth of the data for twice the epochs: two fifths of the steps, twice the passes over each image.
  [small-1k-60]="--model small-resnet --subset 1000 --epochs 60 --runs none,cutout-0.25,cutout"
  [resnet20-1k-60]="--model resnet20 --subset 1000 --epochs 60 --runs none,cutout-0.25,cutout"
)
ORDER=(small-5k-30 resnet20-5k-30 small-1k-60 resnet20-1k-60)

for cell in ${CELLS:-${ORDER[@]}}; do
  [ -n "${CELL[$cell]:-}" ] || { echo "unknown cell $cell; cells: ${ORDER[*]}" >&2; exit 2; }
  echo "=== $cell: gutout compare fashion-mnist ${CELL[$cell]} ${COMMON[*]} --out $OUT/$cell ($(date -u +%FT%TZ))"
  # shellcheck disable=SC2086 # the cell's options are words
  "$GUTOUT" compare fashion-mnist ${CELL[$cell]} "${COMMON[@]}" --out "$OUT/$cell"
done
echo "=== screen done ($(date -u +%FT%TZ))"
