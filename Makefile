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

# Debian packages the suite needs: gcc (the C reference forwarder in the benchmarks) and
# chromium (the browser tests; Playwright drives Debian's build, it never downloads its own).
# redis-server (session state; the tests start their own servers, Sentinel included).
SYSTEM_PACKAGES := gcc chromium redis-server
sysdeps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check relay transceiver pipeline loadtest tests
	$(VENV)/bin/ruff format --check relay transceiver pipeline loadtest tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) sysdeps lint typecheck
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP) sysdeps
	$(PY) -m loadtest.bench

run: $(STAMP) sysdeps
	$(PY) -m loadtest.stack

clean:
	rm -rf $(VENV) bench-results .pytest_cache .mypy_cache .ruff_cache
