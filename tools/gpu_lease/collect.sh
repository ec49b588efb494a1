# On the GPU machine, in the call after lm_launch.sh: waits (up to $1 seconds) for the LM study's processes, packs
# its run folders without checkpoints into $OUT/lm_study.tgz ($OUT takes no deep folders) and summarises it.
limit=${1:-480}; start=$(date +%s)
while pgrep -f "config-name lm_adaptation" > /dev/null && [ $(( $(date +%s) - start )) -lt $limit ]; do sleep 10; done
pgrep -f "config-name lm_adaptation" > /dev/null && echo "still running after ${limit}s: packing what there is"
cp /tmp/lm_*.log $OUT/
tar -C /tmp/lm_study -czf $OUT/lm_study.tgz --exclude='*.pt' --exclude='*.safetensors' --exclude='*.bin' .
w=$(cat /tmp/lm_tree); cd $w
export PYTHONPATH=/tmp/site:$w ATHENA_DATA_DIR=/tmp/athena_gpu_data HF_HUB_OFFLINE=1 WANDB_MODE=offline
python3 bench/summarise_lm_adaptation.py /tmp/lm_study --out $OUT/lm_summary > $OUT/lm_summary.log 2>&1
tail -20 $OUT/lm_summary.log; for m in /tmp/lm_*.log; do echo "== $m"; tail -c 300 $m; done
