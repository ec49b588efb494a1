#!/usr/bin/env bash
# TRM adaptation study (issue 5): pretrain TRM-Att on 9x9 Sudoku, then adapt it to Sudoku-X (both diagonals
# hold 1-9 too) with full fine-tuning and each adapter, every method for the same step budget; the base
# evaluated on Sudoku-X without training is the reference row.
#
#   bash bench/adaptation_trm.sh                       # everything (GPU; ~18 min on one H100 at the defaults)
#   bash bench/adaptation_trm.sh pretrain              # phase 1: the base (~6 min incl. data build + compile)
#   bash bench/adaptation_trm.sh adapt full lora ia3   # phase 2: some methods (~2 min each); base from phase 1
#   bash bench/adaptation_trm.sh adapt moe poly hybrid
#   bash bench/adaptation_trm.sh summary               # table + plot from what is in $OUT
#   TOY=1 bash bench/adaptation_trm.sh                 # CPU plumbing check at toy size (seconds)
#   ARCH=athena_trm_mlp BASE_WEIGHTS=w.pt IMPORT_OVERRIDES="experiment=sudoku_extreme_1k ..." \
#     bash bench/adaptation_trm.sh import   # phase 1 from trained weights instead: wrap them as the base
#                                           # checkpoint and evaluate it zero-shot on Sudoku-X
#
# Knobs (env):
#   OUT               results (default docs/results/adaptation/$ARCH)
#   RUNS              run folders: $RUNS/adapt_base, $RUNS/adapt_<method> (default outputs)
#   ARCH              athena_trm (default); athena_trm_mlp for the TRM-MLP base of bench/time_to_accuracy.py
#   PRETRAIN_STEPS    1500;  ADAPT_STEPS 300
#   FULL_LR           3e-4 (full fine-tuning);  ADAPTER_LR 3e-3
#   BASE              the base checkpoint (default $RUNS/adapt_base/checkpoints/last.pt)
#   BASE_WEIGHTS      import: a bare state dict
#   IMPORT_OVERRIDES  import: the Hydra overrides of the run that trained BASE_WEIGHTS, stored as its config
#   ADAPT_OVERRIDES   extra Hydra overrides for every adaptation run, e.g. train.grad_accum_steps=2
#   PACK              1: one tarball of the runs, for the device tool's 8-file limit
# Phase 1 also writes the base's EMA weights alone to $OUT/adaptation_base_weights.pt (~27 MB): if phase 2
# runs on a fresh machine, bring that file along and pass BASE=<that file> (init_from takes a bare state
# dict); `summary` then needs every $OUT/adaptation_runs/<method>.json (incl. base_zero_shot.json from
# phase 1) in one $OUT.
# Sudoku and Sudoku-X share vocab (11), seq_len (81) and num_puzzle_identifiers (1), so init_from loads as is.
# Results: $OUT/adaptation_trm.jsonl (one JSON line per method), adaptation_trm.md, adaptation_trm.png and
# each run's metrics in $OUT/adaptation_runs/<method>.jsonl.
set -uo pipefail
MODE=${1:-all}
[ $# -gt 0 ] && shift
METHODS=("$@")
[ ${#METHODS[@]} -eq 0 ] && METHODS=(full lora ia3 moe poly hybrid)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 ATHENA_DATA_DIR=${ATHENA_DATA_DIR:-data}
RUNS=${RUNS:-outputs}  # where the runs go: $RUNS/adapt_base, $RUNS/adapt_<method>
BASE_DIR=$RUNS/adapt_base
BASE=${BASE:-$BASE_DIR/checkpoints/last.pt}
ARCH=${ARCH:-athena_trm}
OUT=${OUT:-docs/results/adaptation/$ARCH}
mkdir -p "$OUT/adaptation_runs"

if [ "${TOY:-0}" = 1 ]; then
  # A 32-wide TRM on 16 generated 9x9 puzzles per split: proves the plumbing on a CPU, learns nothing useful.
  PRETRAIN_STEPS=${PRETRAIN_STEPS:-4}
  ADAPT_STEPS=${ADAPT_STEPS:-4}
  DATA_TOY=(data.build.num_train=16 data.build.num_aug=1 data.build.num_test=16 data.build.min_difficulty=0)
  COMMON=(arch="$ARCH" arch.hidden_size=32 arch.num_heads=2 arch.H_cycles=1 arch.L_cycles=1
          arch.halt_max_steps=2 arch.puzzle_emb_len=2 device=cpu train.global_batch_size=16
          train.eval_batch_size=32 train.log_every=2 train.lr_warmup_steps=1 train.eval_every=null
          train.checkpoint_every=null train.num_workers=0 train.compile=false train.ema_decay=0.9 "${DATA_TOY[@]}")
  PRETRAIN_EXTRA=()
  ADAPT_EXTRA=()
else
  PRETRAIN_STEPS=${PRETRAIN_STEPS:-1500}
  ADAPT_STEPS=${ADAPT_STEPS:-300}
  DATA_TOY=()
  # The paper's Sudoku setting (batch 768, bf16, weight decay 1.0) at TRM-Att size, shortened: a higher lr with
  # a short warm-up and EMA 0.99 (0.999 lags ~1000 steps behind, too long for these budgets).
  COMMON=(experiment=sudoku_extreme_1k arch="$ARCH" train.epochs=null train.eval_every=null
          train.checkpoint_every=null train.log_every=50 train.ema_decay=0.99)
  PRETRAIN_EXTRA=(train.lr=3e-4 train.lr_warmup_steps=200 train.compile=true)
  # Eager for every adaptation run, so step times compare like with like (and no compile time in the budget).
  ADAPT_EXTRA=(train.compile=false train.lr_warmup_steps=30 train.log_every=25)
  if [ "$MODE" != summary ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/adaptation_device.txt"
    $PY -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/adaptation_device.txt"
  fi
fi

# Learning rate per method: full fine-tuning continues at the pretraining lr; adapters (few parameters, zero
# or identity init) take 10x, as is usual for LoRA-style methods.
lr_for() { case "$1" in full) echo "${FULL_LR:-3e-4}" ;; *) echo "${ADAPTER_LR:-3e-3}" ;; esac; }

zero_shot() {  # the reference row: the base on Sudoku-X without any training
  $PY evaluate.py checkpoint="$BASE" data=sudoku_x "${DATA_TOY[@]}" eval.name=zero_shot_sudoku_x \
    eval.output_dir="$OUT/adaptation_runs" eval.batch_size=512 2>&1 | grep -v "it/s\]" | tail -n 3
  # evaluate.py's data= keeps the default build unless overridden; its result goes to $OUT/adaptation_runs.
  $PY bench/summarise_adaptation.py collect-eval base_zero_shot "$OUT/adaptation_runs/zero_shot_sudoku_x.json" \
    > "$OUT/adaptation_runs/base_zero_shot.json"
}

import_base() {  # BASE_WEIGHTS (a bare state dict) -> the base checkpoint, its config composed from
  # IMPORT_OVERRIDES: the overrides of the run that trained the weights (default: phase 1's recipe at ARCH)
  local overrides=("${COMMON[@]}" data=sudoku train.steps="$PRETRAIN_STEPS" "${PRETRAIN_EXTRA[@]}")
  [ -n "${IMPORT_OVERRIDES:-}" ] && read -r -a overrides <<< "$IMPORT_OVERRIDES"
  mkdir -p "$(dirname "$BASE")"
  $PY bench/summarise_adaptation.py wrap-weights "${BASE_WEIGHTS:?set BASE_WEIGHTS=<state dict file>}" "$BASE" \
    "${overrides[@]}" || exit 1
  zero_shot
}

pretrain() {
  rm -rf "$BASE_DIR"
  $PY pretrain.py "${COMMON[@]}" data=sudoku train.steps="$PRETRAIN_STEPS" "${PRETRAIN_EXTRA[@]}" \
    hydra.run.dir="$BASE_DIR" 2>&1 | grep -v "it/s\]" | tail -n 20
  cp "$BASE_DIR/metrics.jsonl" "$OUT/adaptation_runs/base_sudoku.jsonl"
  cp "$BASE_DIR/eval/final.json" "$OUT/adaptation_runs/base_sudoku_final.json"
  # Weights only (EMA where present) -- small enough to carry to a fresh machine for phase 2.
  $PY bench/summarise_adaptation.py export-weights "$BASE" "$OUT/adaptation_base_weights.pt"
  zero_shot
}

adapt() {  # method
  local method=$1 dir="$RUNS/adapt_$1" adapter=$1
  [ "$method" = full ] && adapter=none
  rm -rf "$dir"; mkdir -p "$RUNS"
  $PY pretrain.py "${COMMON[@]}" data=sudoku_x train.steps="$ADAPT_STEPS" "${ADAPT_EXTRA[@]}" adapter="$adapter" \
    init_from="$BASE" train.lr="$(lr_for "$method")" hydra.run.dir="$dir" ${ADAPT_OVERRIDES:-} > "$dir.log" 2>&1
  grep -v "it/s\]" "$dir.log" | tail -n 4
  cp "$dir/metrics.jsonl" "$OUT/adaptation_runs/$method.jsonl" 2>/dev/null
  if ! $PY bench/summarise_adaptation.py collect "$method" "$dir" > "$OUT/adaptation_runs/$method.json"; then
    # A failed run keeps its whole log next to the results (the console only showed its last lines).
    echo "{\"method\": \"$method\", \"error\": \"run failed, see $method.log\"}" > "$OUT/adaptation_runs/$method.json"
    grep -v "it/s\]" "$dir.log" > "$OUT/adaptation_runs/$method.log"; tail -n 25 "$OUT/adaptation_runs/$method.log"
  fi
}

summary() {
  : > "$OUT/adaptation_trm.jsonl"
  for m in base_zero_shot full lora ia3 moe poly hybrid; do
    f="$OUT/adaptation_runs/$m.json"
    [ -s "$f" ] && grep -q test_exact_accuracy "$f" && cat "$f" >> "$OUT/adaptation_trm.jsonl"
  done
  $PY bench/summarise_adaptation.py table "$OUT/adaptation_trm.jsonl" --md "$OUT/adaptation_trm.md" \
    --png "$OUT/adaptation_trm.png"
}

case "$MODE" in
  all) pretrain; for m in "${METHODS[@]}"; do adapt "$m"; done; summary ;;
  pretrain) pretrain ;;
  import) import_base ;;
  adapt) for m in "${METHODS[@]}"; do adapt "$m"; done; summary ;;
  summary) summary ;;
  *) echo "usage: $0 [all|pretrain|import|adapt METHOD...|summary]"; exit 2 ;;
esac
# The device tool returns at most 8 files (16 MB each) per call: PACK=1 folds $OUT/adaptation_runs into one
# tarball (on 2026-11-22 poly's record was lost to that limit). The base weights file (~27 MB) never fits.
if [ "${PACK:-0}" = 1 ] && [ -d "$OUT/adaptation_runs" ]; then
  tar -czf "$OUT/adaptation_runs.tgz" -C "$OUT" adaptation_runs && rm -rf "$OUT/adaptation_runs" "$OUT/adaptation_base_weights.pt"
fi
