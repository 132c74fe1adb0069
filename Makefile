# bitrain: the README's two commands are `make demo` and `make test`.
# Each creates .venv with python3 -m venv and (re)installs the project when missing or stale.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.bitrain-installed

.PHONY: install demo test test-fast lint format bench gpu-check clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) scripts/check_install_space.py $(VENV)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e '.[test,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m bitrain.demo

test: $(STAMP)
	$(PY) -m pytest tests -q

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check bitrain scripts tests
	$(PY) -m ruff format --check bitrain scripts tests

format: $(STAMP)
	$(PY) -m ruff format bitrain scripts tests
	$(PY) -m ruff check --fix bitrain scripts tests

bench: $(STAMP)
	$(PY) scripts/bench_pretrain.py --model tiny --device cpu

# On a lent GPU: benchmarks + CUDA-only tests (limits add up to < 8 min), one JSON summary
# (docs/benchmarks.md).
# Exits 2 with "no GPU" on a machine without CUDA.
gpu-check: $(STAMP)
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
