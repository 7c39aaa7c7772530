# Two set-up commands: `make demo` and `make test`. Each creates .venv with everything it needs.
# torch is pinned to the CPU build this machine provides; set TORCH_SPEC to use another
# (e.g. TORCH_SPEC="torch" for your CUDA build), or point PYTHON at an existing environment.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export TORCH_PINS := import torch; v = torch.__version__.split("+")[0]; print(f"torch=={v} torchvision==0.{int(v.split('.')[1]) + 15}.*")

.PHONY: demo test lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	@# The installed torch is pinned, with the torchvision release made for it (minor + 15), so that no
	@# dependency (lmms-eval wants torchvision) replaces it with a newer CUDA build of several GB, and
	@# pip does not spend minutes backtracking through torchvision releases.
	$(BIN)/python -m pip install -q -e ".[test,lmms]" $$($(BIN)/python -c "$$TORCH_PINS")
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
