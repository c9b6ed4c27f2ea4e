# Two entry points: `make demo` (install + default simulation) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmfed-installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
# Flower's CLI starts its own executables (flower-superlink) from PATH.
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: install demo test lint clean

# torch goes in first and pinned: an unpinned resolve would pull a CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mmfed simulate --out runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy mmfed
	# three workers on two cores, one file each: many tests wait on real processes,
	# sockets and Flower polling (quiet 2-core machine: 12 min 46 s vs 14 min 20 s with two)
	$(PY) -m pytest -q -n 3 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy mmfed

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
