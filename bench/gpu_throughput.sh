#!/usr/bin/env bash
# Throughput of Athena vs the official TRM and nano-trm on one GPU; results merged into $OUT/throughput.json.
#   bash bench/gpu_throughput.sh athena          Athena's recipes (+ kernel tables), both TRM-MLP layouts
#   bash bench/gpu_throughput.sh references      the official TRM and nano-trm (code under .ref/, never committed)
#   bash bench/gpu_throughput.sh all
set -uo pipefail
OUT=${OUT:-docs/results/throughput}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 ATHENA_DATA_DIR=${ATHENA_DATA_DIR:-data}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$OUT/device.txt"
JSON="$OUT/throughput.json"
bench() { python3 bench/throughput.py --out "$JSON" "$@" 2>&1 | grep --line-buffered -v "it/s\]" | tee -a "$OUT/throughput_log.txt"; }
case "${1:-all}" in
  athena|all)
    bench --impls athena --recipes sudoku_att sudoku_mlp grid30_att --profile "$OUT"
    bench --impls athena --recipes sudoku_mlp --variant rerun ;;&
  references|all)
    bench --impls official nano --recipes sudoku_att sudoku_mlp grid30_att ;;
esac
