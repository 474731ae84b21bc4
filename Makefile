# Tidal: `make demo` and `make test` do all the set-up on a fresh machine with Python 3.11.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tidal-dev
PYTEST_ARGS ?=

.PHONY: venv test test-unit test-integration demo bench bench-all bench-sim bench-spike bench-serving bench-resize bench-runtime bench-chaos lint clean

venv: $(STAMP)

# One virtual environment; each target installs the extras it needs (the core, then [demo], [bench] or
# [dev]) once, and again when pyproject.toml changes.
$(VENV)/.tidal-%: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# The CPU build of torch lies on this machine's disk; plain `torch` would pull several GB.
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[$*]"
	@touch $@

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration: venv
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

# ruff, and the import-linter contracts of pyproject.toml (the layers; what imports neither ray nor torch).
lint: venv
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests/unit/test_layers.py

demo: $(VENV)/.tidal-demo
	$(PY) -m tidal.demo

# The quick benchmarks (pure: a few minutes). Each script writes bench/results/<name>.json.
bench: $(VENV)/.tidal-bench
	@mkdir -p bench/results
	$(PY) bench/decide_scale.py
	$(PY) bench/simulate_decide.py

# The whole set: the 8-week simulation and the benchmarks that start real local Ray clusters.
bench-all: bench bench-sim bench-spike bench-serving bench-resize bench-runtime bench-chaos

bench-sim: $(VENV)/.tidal-bench
	$(PY) bench/simulate.py
	$(PY) bench/simulate.py --case saturated

bench-spike: $(VENV)/.tidal-bench
	$(PY) bench/spike.py

bench-serving: $(VENV)/.tidal-bench
	$(PY) bench/serving_bench.py --out bench/results/serving.json

bench-resize: $(VENV)/.tidal-bench
	$(PY) bench/resize.py --cycles 5 --output bench/results/resize.json

bench-runtime: $(VENV)/.tidal-bench
	$(PY) bench/runtime_latency.py

# One fault per case mid-reclaim under the spike: the arbiter killed, a replica's node lost, a job's driver killed.
bench-chaos: $(VENV)/.tidal-bench
	$(PY) bench/chaos.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-output bench/results build dist *.egg-info
