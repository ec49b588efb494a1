# On the GPU machine (call 3, carrying .gpu3): unpacks the LM datasets and starts the SmolLM2 adaptation study, one
# process per method sharing the GPU, from a copy of the tree under /tmp so that it outlives this call.
#   bash .gpu3/lm_launch.sh [extra overrides, e.g. seed=1]      METHODS="full lora" to run fewer at once
set -e
tar -C / -xJf .gpu3/data.tar.xz   # the built LM datasets, into /tmp/athena_gpu_data
cp .gpu3/collect.sh /tmp/collect.sh
w=$(mktemp -d /tmp/athena.XXXX); cp -r . $w; rm -rf $w/.gpu3; cd $w
export PYTHONPATH=/tmp/site:$w PYTHONUNBUFFERED=1 ATHENA_DATA_DIR=/tmp/athena_gpu_data HF_HUB_OFFLINE=1 WANDB_MODE=offline
echo $w > /tmp/lm_tree
for m in ${METHODS:-full lora ia3 moe poly hybrid}; do
  setsid nohup python3 pretrain.py -m --config-dir sweeps --config-name lm_adaptation adaptation=$m "$@" \
    data_root=/tmp/athena_gpu_data hydra.sweep.dir=/tmp/lm_study > /tmp/lm_$m.log 2>&1 < /dev/null &
done
echo "started the LM study at $(date -u +%T)"
