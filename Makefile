# `make run`: the quickstart (Defend++ and a plain baseline on the embedded digits, offline).
# `make test`: the whole test suite, on TEST_WORKERS processes (pytest-xdist; 2 = this project's
# 2-core machines: compilation, which dominates the suite, is single-threaded). Both create .venv
# from requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export PYTHONPATH := $(CURDIR)

.PHONY: run test venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

run: venv
	$(PY) -m launch.quickstart --workdir=runs/quickstart

test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=30 tests

clean:
	rm -rf runs .cache
