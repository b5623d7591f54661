# One-command set-up: `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch; users with GPUs install their CUDA torch into the venv first (see README).
TORCH_SPEC ?= torch==2.13.0
# img2dataset lives in its own venv (it pins old webdataset and pulls the dataclasses backport).
VENV_I2D ?= .venv-img2dataset
I2D_SPEC ?= img2dataset==1.47.0

.PHONY: setup test test-fast lint format demo smoke clean llama-vocab llama-cpp-programs

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

$(VENV_I2D)/.installed:
	$(PYTHON) -m venv $(VENV_I2D)
	$(VENV_I2D)/bin/pip install -q --upgrade pip
	$(VENV_I2D)/bin/pip install -q "$(I2D_SPEC)"
	NO_ALBUMENTATIONS_UPDATE=1 $(VENV_I2D)/bin/python -c "import img2dataset"
	touch $@

setup: $(VENV)/.installed $(VENV_I2D)/.installed

test: setup llama-cpp-programs
	$(BIN)/pytest -q --durations=40

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

# From the installed llama-cpp-python's sdist on the package registry (kept in ~/.cache/mvlm):
# llama.cpp's LLaMA SentencePiece vocabulary with its tokenizer test cases (the tests fetch it too),
# and llama.cpp's llama-completion, llama-mtmd-cli and llama-bench for the binary device backend.
llama-vocab: setup
	$(BIN)/python -m tasks.testkit.llama_cpp_source vocab

llama-cpp-programs: setup
	$(BIN)/python -m tasks.testkit.llama_cpp_source programs

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The whole pipeline on embedded defaults: local Ray, Prefect's ephemeral API, MLflow on SQLite
# under work_dir/. Ends with a summary and the command that opens the MLflow UI on that store.
demo: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/mvlm data make-samples
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/mvlm retrain tiny

smoke: setup
	$(BIN)/mvlm model smoke

clean:
	rm -rf $(VENV) $(VENV_I2D) .pytest_cache .ruff_cache
