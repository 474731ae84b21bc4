# Tidal: `make demo` and `make test` do all the set-up on a fresh machine with Python 3.11.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tidal-installed
PYTEST_ARGS ?=

.PHONY: venv test test-unit test-integration demo bench bench-all bench-sim bench-spike bench-serving bench-resize bench-runtime lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on this machine's disk; plain `torch` would pull several GB.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: venv
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

demo: venv
	$(PY) -m tidal.demo

# The quick benchmarks (pure: a few minutes). Each script writes bench/results/<name>.json.
bench: venv
	@mkdir -p bench/results
	$(PY) bench/decide_scale.py
	$(PY) bench/simulate_decide.py

# The whole set: the 8-week simulation and the benchmarks that start real local Ray clusters.
bench-all: bench bench-sim bench-spike bench-serving bench-resize bench-runtime

bench-sim: venv
	$(PY) bench/simulate.py
	$(PY) bench/simulate.py --case saturated

bench-spike: venv
	$(PY) bench/spike.py

bench-serving: venv
	$(PY) bench/serving_bench.py --out bench/results/serving.json

bench-resize: venv
	$(PY) bench/resize.py --cycles 5 --output bench/results/resize.json

bench-runtime: venv
	$(PY) bench/runtime_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-output bench/results
