# Every target bootstraps .venv itself: torch first (from TORCH_SPEC, so pip never pulls a multi-GB
# CUDA build unasked), then the project and its pinned dependencies.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format ui clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wan-assets demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

HOST ?= 127.0.0.1
PORT ?= 3000
ui: $(STAMP)
	$(BIN)/wan-assets ui --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .wan_assets .pytest_cache .ruff_cache
