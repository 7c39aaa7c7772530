# Two set-up commands: `make demo` and `make test`. Each creates .venv with everything it needs.
# torch is pinned to the CPU build this machine provides; set TORCH_SPEC to use another
# (e.g. TORCH_SPEC="torch" for your CUDA build), or point PYTHON at an existing environment.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: demo test lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,lmms]"
	@# lmms-eval pulls torchvision from PyPI; one built for another torch cannot even be imported
	@# ("operator torchvision::nms does not exist") and then breaks transformers' imports. Drop it.
	$(BIN)/python -c "import torchvision" 2>/dev/null || $(BIN)/python -m pip uninstall -q -y torchvision
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/crosstrim demo

test: venv
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info
