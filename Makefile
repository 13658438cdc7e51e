# Two commands for a fresh machine (see README.md):
#   make demo   - set up and run the main job on the embedded default
#   make test   - set up and run the tests
# and one more:
#   make dev    - the Dagster UI (dg dev) on the same embedded state as the demo
# Installs are locked: .venv gets exactly the versions in requirements.lock (pip
# constraints). pyproject.toml keeps compatible ranges for library users.
#   make lock        - re-resolve requirements.lock on purpose (uv), then run make test
#   make test-latest - ruff + pytest in .venv-latest, built WITHOUT the lock (newest allowed)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# pip itself is pinned too: a new pip release must not change what `make setup` does.
PIP_VERSION := 26.3
LATEST := .venv-latest
# `make lock` moves every pin to the newest version pyproject.toml allows; to keep
# the current pins and only resolve what pyproject.toml changed: make lock LOCK_UPGRADE=
LOCK_UPGRADE ?= --upgrade

.PHONY: setup demo dev test test-latest lock bench lint clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet 'pip==$(PIP_VERSION)'
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/esper demo

# dg dev on the demo's embedded instance: DAGSTER_HOME is ESPER_HOME/dagster (whatever
# ESPER_HOME is), so the UI shows the demo's runs and the sensor does not run the same
# file contents again. (dagster dev then says the top-level dagster.yaml is not used:
# it is for commands run with DAGSTER_HOME unset.) VIRTUAL_ENV: as if .venv were
# activated, which dg expects of the project's venv.
dev: $(STAMP)
	DAGSTER_HOME="$$($(BIN)/esper dagster-home)" VIRTUAL_ENV="$(CURDIR)/$(VENV)" $(BIN)/dg dev

test: $(STAMP)
	$(BIN)/ruff check esper_assets esper_assets_tests
	VIRTUAL_ENV="$(CURDIR)/$(VENV)" $(BIN)/dg check defs
	$(BIN)/pytest

# The same checks on the newest releases pyproject.toml allows (no lock): an early
# warning before `make lock`. Rebuilt from scratch each time.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(LATEST)/bin/pip install --quiet -e '.[test]'
	$(LATEST)/bin/ruff check esper_assets esper_assets_tests
	$(LATEST)/bin/pytest

# uv resolves for every platform (--universal) in one go; it runs from a throwaway
# venv, so installs (above) need nothing but pip.
lock:
	tool="$$(mktemp -d)" && trap 'rm -rf "$$tool"' EXIT && \
	$(PYTHON) -m venv "$$tool" && \
	"$$tool/bin/pip" install --quiet 'uv>=0.5' && \
	"$$tool/bin/uv" pip compile pyproject.toml --extra test --universal \
		--python-version 3.11 $(LOCK_UPGRADE) --quiet --custom-compile-command 'make lock' \
		-o $(LOCK)

bench: $(STAMP)
	$(BIN)/esper bench cache
	$(BIN)/esper bench repository
	$(BIN)/esper bench pipeline

lint: $(STAMP)
	$(BIN)/ruff check esper_assets esper_assets_tests

clean:
	rm -rf $(VENV) $(LATEST) .esper .pytest_cache
