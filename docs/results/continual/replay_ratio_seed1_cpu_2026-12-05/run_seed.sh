# Stage 2 of the TRM continual study (seed $2) at another replay ratio, from the same stage-1 checkpoint.
set -e
r=$1; # usage: run_seed.sh RATIO SEED STAGE1_RUN_DIR
cd /work/main; source .venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline
d=/tmp/rr/seed$2/stage2_rehearsal_$r
python pretrain.py data=sudoku6_x init_from=$3/checkpoints/last.pt \
  rehearsal=buffer "rehearsal.from_data=[/tmp/athena_data/sudoku6-2f07a401]" rehearsal.budget=1000 \
  rehearsal.replay_ratio=$r rehearsal.seed=$2 data_root=/tmp/athena_data seed=$2 train.steps=1000 \
  hydra.run.dir=$d device=cpu > /tmp/rr/train_s$2_$r.log 2>&1
for t in sudoku6 sudoku6_x; do
  python evaluate.py checkpoint=$d/checkpoints/last.pt data=$t data_root=/tmp/athena_data eval.output_dir=$d/eval eval.name=on_$t >> /tmp/rr/eval_s$2_$r.log 2>&1
done
echo done $r
