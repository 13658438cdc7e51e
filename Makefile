# Two commands for a fresh machine (see README.md):
#   make demo   - set up and run the main job on the embedded default
#   make test   - set up and run the tests
# and one more:
#   make dev    - the Dagster UI (dagster dev) on the same embedded state as the demo
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo dev test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/esper demo

# DAGSTER_HOME is the demo's embedded instance (ESPER_HOME/dagster), so the UI shows
# the demo's runs and the sensor does not run the same file contents again.
dev: $(STAMP)
	DAGSTER_HOME="$$($(BIN)/esper dagster-home)" $(BIN)/dagster dev -w workspace.yaml

test: $(STAMP)
	$(BIN)/ruff check esper_assets esper_assets_tests
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/esper bench cache
	$(BIN)/esper bench repository
	$(BIN)/esper bench pipeline

lint: $(STAMP)
	$(BIN)/ruff check esper_assets esper_assets_tests

clean:
	rm -rf $(VENV) .esper .pytest_cache
