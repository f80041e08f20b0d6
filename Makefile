# Every target bootstraps .venv itself: torch first (from TORCH_SPEC, so pip never pulls a multi-GB
# CUDA build unasked), then every other dependency at the exact version in requirements.lock, then
# the project itself without dependencies. A fresh machine resolves what CI resolved.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock

.PHONY: demo test lint format ui lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/wan-assets demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy wan_assets resources

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Re-resolve the lock on purpose (after changing pyproject.toml's dependencies), never by drift:
# pins already in the lock are kept unless `make lock UPGRADE=1` asks for the newest of everything.
# torch stays out of it: TORCH_SPEC picks the build (CPU here, CUDA on a GPU machine).
lock: $(STAMP)
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/torch.txt
	$(BIN)/python -m uv pip compile pyproject.toml --extra dev --python-version 3.11 $(if $(UPGRADE),--upgrade,) \
		-c $(VENV)/torch.txt --no-emit-package torch -o $(LOCK) \
		$(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

HOST ?= 127.0.0.1
PORT ?= 3000
CONFIG ?=
ui: $(STAMP)
	$(BIN)/wan-assets ui $(CONFIG) --host $(HOST) --port $(PORT)

clean:
	rm -rf $(VENV) .wan_assets .pytest_cache .ruff_cache
