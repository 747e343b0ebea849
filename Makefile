# The two set-up commands of the README:  make demo  and  make test  (each creates .venv if missing).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The torch build to install first (these machines carry 2.14.1 on disk; elsewhere pick yours).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_MARKERS ?= not slow and not gpu
export MUJOCO_GL ?= egl

.PHONY: install demo test lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e '.[all,dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m data.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -m "$(PYTEST_MARKERS)" -q

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs datasets .pytest_cache .ruff_cache
