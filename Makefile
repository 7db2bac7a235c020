# voicerelay — every target keeps its virtual environment in .venv at the repository root.
# All targets are idempotent: run them as often as you like on a fresh Debian machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-deps
PYTEST_ARGS ?=

.PHONY: all run test lint typecheck bench clean venv sysdeps

all: test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# System packages the suite needs (gcc for the C reference forwarder in the benchmarks).
sysdeps:
	@command -v gcc >/dev/null || (apt-get update -q && apt-get install -y -q gcc)

lint: $(STAMP)
	$(VENV)/bin/ruff check relay transceiver pipeline loadtest tests
	$(VENV)/bin/ruff format --check relay transceiver pipeline loadtest tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) sysdeps lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP) sysdeps
	$(PY) -m loadtest.bench

run: $(STAMP)
	$(PY) -m loadtest.stack

clean:
	rm -rf $(VENV) bench-results .pytest_cache .mypy_cache .ruff_cache
