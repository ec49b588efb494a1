#!/usr/bin/env bash
# The paper-size Sudoku recipe (experiment=sudoku_extreme_1k: batch 768, bf16, torch.compile) on one
# GPU, on our generated hard 9x9 set (data=sudoku, built on first use, ~40 s on 16 cores).
#   bash bench/gpu_sudoku_recipe.sh curve [STEPS]        TRM-MLP, eval on 1000 test puzzles every 300 steps
#   bash bench/gpu_sudoku_recipe.sh throughput [STEPS]   TRM-Att and TRM-MLP, compiled and eager, no evals
# Metrics (metrics.jsonl per run) and a markdown summary land in $OUT (default docs/results/sudoku_recipe/<mode>/).
set -uo pipefail
MODE=${1:-curve}
STEPS=${2:-}
OUT=${OUT:-docs/results/sudoku_recipe/$MODE}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ATHENA_DATA_DIR=${ATHENA_DATA_DIR:-data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/device.txt"

run() {  # name, steps, extra overrides...
  local name=$1 steps=$2; shift 2
  local dir="outputs/gpu_$name"
  rm -rf "$dir"
  # a live copy of the metrics in $OUT, so a run cut short still reports what it did
  (while sleep 15; do cp "$dir/metrics.jsonl" "$OUT/$name.jsonl" 2>/dev/null || true; done) &
  local copier=$!
  python3 pretrain.py experiment=sudoku_extreme_1k train.epochs=null train.steps="$steps" train.log_every=50 \
    train.checkpoint_every=null hydra.run.dir="$dir" "$@" 2>&1
  kill "$copier" 2>/dev/null
  cp "$dir/metrics.jsonl" "$OUT/$name.jsonl"
}

case "$MODE" in
  curve)
    run trm_mlp_curve "${STEPS:-1200}" train.eval_every=300 train.eval_examples=1000
    python3 bench/summarise_run.py "$OUT"/trm_mlp_curve.jsonl | tee "$OUT/summary.md" ;;
  throughput)
    run trm_att_compiled "${STEPS:-250}" arch=athena_trm train.eval_every=null
    run trm_mlp_compiled "${STEPS:-250}" train.eval_every=null
    run trm_att_eager 100 arch=athena_trm train.eval_every=null train.compile=false
    run trm_mlp_eager 100 train.eval_every=null train.compile=false
    python3 bench/summarise_run.py "$OUT"/trm_*_compiled.jsonl "$OUT"/trm_*_eager.jsonl | tee "$OUT/summary.md" ;;
  *) echo "usage: $0 curve|throughput [STEPS]"; exit 2 ;;
esac
