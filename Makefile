# modelgate: `make run` and `make test` work on a fresh clone with Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# `make run` writes structlog's console lines; a deployment keeps the default, JSON.
LOG_FORMAT ?= console

BENCH_ARGS ?=

.PHONY: run test lint mutation bench bench-deps install clean

$(BIN)/modelgate: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,otel]"
	@touch $@

install: $(BIN)/modelgate

run: install
	$(BIN)/modelgate db upgrade
	$(BIN)/modelgate models train --if-absent
	@echo ""
	@echo "modelgate is starting on http://$(HOST):$(PORT) (embedded SQLite, in-process limiter)."
	@echo "In another terminal, create an admin key with:"
	@echo "    $(BIN)/modelgate admin create-key --name ops"
	@echo "then follow the five-minute tour in README.md."
	@echo ""
	MODELGATE_LOG_FORMAT=$(LOG_FORMAT) $(BIN)/modelgate serve --host $(HOST) --port $(PORT)

# The suite over TEST_WORKERS processes (pytest-xdist); tests/parallel.py says how they share the
# machine. TEST_WORKERS=0 runs it in this one process. The slowest tests are listed at the end of
# every run: CI's whole run must stay under 15 minutes.
TEST_WORKERS ?= 4
test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder --durations=20

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

mutation: install  ## mutmut over the security-critical modules: about an hour on 2 cores (docs/testing.md)
	MODELGATE_TEST_REQUIRE_SERVICES=1 nice -n 10 $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

bench-deps:  ## wrk, the load generator (Debian/Ubuntu, as root)
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
