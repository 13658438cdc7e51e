# Two commands for a fresh machine (see README.md):
#   make demo   - set up and run the main job on the embedded default
#   make test   - set up and run the tests
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/esper demo

test: $(STAMP)
	$(BIN)/ruff check esper_assets esper_assets_tests
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/esper bench cache

lint: $(STAMP)
	$(BIN)/ruff check esper_assets esper_assets_tests

clean:
	rm -rf $(VENV) .esper .pytest_cache
