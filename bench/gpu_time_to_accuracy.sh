#!/usr/bin/env bash
# A time-to-accuracy run on the GPU as ONE continuous run that outlives a single 10-minute device command:
#   bash bench/gpu_time_to_accuracy.sh start [MINUTES] [OVERRIDES...]   Athena (bench/time_to_accuracy.py),
#                                           launched detached (setsid), followed for 9 min; OVERRIDES go to
#                                           pretrain.py (arch.x=y)
#   bash bench/gpu_time_to_accuracy.sh start-official [EVALS]          the official TRM's own pipeline
#                                           (bench/official_pipeline.py, EVALS evals 1000 steps apart, default 7)
#   bash bench/gpu_time_to_accuracy.sh follow            follow it until it ends (or 9 min), in the next command
# Each call copies what exists so far (tta.json, tta.png, metrics.jsonl, the log's tail) to $OUT.
# Start it on a FRESH device machine: a machine goes back 30 minutes after it was started, whatever runs on it
# (on 2026-11-22 a warm machine was reused and the run was cut at 20 min, before its final eval).
set -uo pipefail
OUT=${OUT:-docs/results/time_to_accuracy/athena}
RUN=outputs/tta_bench
mkdir -p "$RUN" "$OUT"
export PYTHONUNBUFFERED=1 ATHENA_DATA_DIR=${ATHENA_DATA_DIR:-data}
case "${1:-follow}" in
  start|start-official)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$RUN/device.txt"
    if [ "$1" = start ]; then
      cmd=(bench/time_to_accuracy.py --minutes "${2:-20}" --out "$RUN/out" --run-dir "$RUN/run" "${@:3}")
    else
      cmd=(bench/official_pipeline.py --evals "${2:-7}" --out "$RUN/out" --run-dir "$RUN/run")
    fi
    setsid nohup python3 "${cmd[@]}" > "$RUN/log.txt" 2>&1 < /dev/null &
    echo $! > "$RUN/pid"
    sleep 5;;
esac
running() { kill -0 "$(cat "$RUN/pid")" 2> /dev/null; }
end=$((SECONDS + 540))
while [ $SECONDS -lt $end ] && running; do
  sleep 15
  tr '\r' '\n' < "$RUN/log.txt" | grep -v "it/s\]" | tail -n 40 > "$OUT/log_tail.txt"
done
tr '\r' '\n' < "$RUN/log.txt" | grep -v "it/s\]" | tail -n 60 > "$OUT/log_tail.txt"
cp "$RUN/device.txt" "$OUT/" 2>/dev/null
cp "$RUN"/out/* "$OUT/" 2>/dev/null
cp "$RUN/run/metrics.jsonl" "$OUT/" 2>/dev/null
if running; then echo "still running"; else
  echo "finished"
  # The trained model (EMA weights only, fp32) as the base of the adaptation study, in parts under the device
  # tool's 16 MB-per-file limit: `cat base_weights.pt.part* > w.pt`, then
  # `python bench/summarise_adaptation.py wrap-weights w.pt ...` makes it the adaptation study's base (docs/adaptation.md,
  # study 2, has the whole command).
  if [ -f "$RUN/run/checkpoints/last.pt" ] && [ ! -f "$OUT/base_weights.pt.partaa" ]; then
    python3 bench/summarise_adaptation.py export-weights "$RUN/run/checkpoints/last.pt" "$RUN/base_weights.pt" \
      && split -b 15M "$RUN/base_weights.pt" "$OUT/base_weights.pt.part"
  fi
fi
tail -n 5 "$OUT/log_tail.txt"
