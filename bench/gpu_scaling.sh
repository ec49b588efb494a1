#!/usr/bin/env bash
# Multi-GPU scaling of the paper-size Sudoku recipe (TRM-Att, batch 768 in total, bf16, compiled):
# the same run on 1 GPU and under torchrun on N GPUs, samples/s from the 50-step windows.
#   bash bench/gpu_scaling.sh [N_GPUS] [STEPS]
set -uo pipefail
N=${1:-2}
STEPS=${2:-300}
OUT=${OUT:-docs/results/scaling}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ATHENA_DATA_DIR=${ATHENA_DATA_DIR:-data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/scaling_device.txt"
COMMON=(experiment=sudoku_extreme_1k arch=athena_trm data.build.num_test=768 train.epochs=null
        train.steps="$STEPS" train.log_every=50 train.eval_every=null train.checkpoint_every=null)
python3 pretrain.py "${COMMON[@]}" hydra.run.dir=outputs/scaling_1gpu 2>&1 | tr '\r' '\n' | grep -E "athena\]|rror" 
cp outputs/scaling_1gpu/metrics.jsonl "$OUT/scaling_1gpu.jsonl"
torchrun --nproc_per_node="$N" pretrain.py "${COMMON[@]}" hydra.run.dir="outputs/scaling_${N}gpu" 2>&1 \
  | tr '\r' '\n' | grep -E "athena\]|rror"
cp "outputs/scaling_${N}gpu/metrics.jsonl" "$OUT/scaling_${N}gpu.jsonl"
python3 bench/summarise_run.py "$OUT/scaling_1gpu.jsonl" "$OUT/scaling_${N}gpu.jsonl" | tee "$OUT/scaling_summary.md"
