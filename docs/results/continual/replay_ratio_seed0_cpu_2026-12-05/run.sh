# Stage 2 of the TRM continual study (seed 0) at another replay ratio, from the same stage-1 checkpoint.
set -e
r=$1; cd /work/main; source .venv/bin/activate
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 WANDB_MODE=offline
d=/tmp/rr/stage2_rehearsal_$r
python pretrain.py data=sudoku6_x init_from=/tmp/ctfull/out/continual_trm_runs/stage1/checkpoints/last.pt \
  rehearsal=buffer "rehearsal.from_data=[/tmp/athena_data/sudoku6-2f07a401]" rehearsal.budget=1000 \
  rehearsal.replay_ratio=$r rehearsal.seed=0 data_root=/tmp/athena_data seed=0 train.steps=1000 \
  hydra.run.dir=$d device=cpu > /tmp/rr/train_$r.log 2>&1
for t in sudoku6 sudoku6_x; do
  python evaluate.py checkpoint=$d/checkpoints/last.pt data=$t data_root=/tmp/athena_data eval.output_dir=$d/eval eval.name=on_$t >> /tmp/rr/eval_$r.log 2>&1
done
echo done $r
