# The two commands a newcomer needs: `make demo` and `make test`. Both set up
# everything they need (a virtualenv with the project and its tools, local services).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench services monitoring-tools browser

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

services:
	@scripts/ensure-services

# promtool and prometheus (Debian's package) for the alert-rule and scrape tests.
monitoring-tools:
	@scripts/ensure-prometheus

# Debian's chromium for the web console's browser test.
browser:
	@scripts/ensure-browser

demo: $(BIN)/.installed services
	$(BIN)/postroom demo

test: $(BIN)/.installed services monitoring-tools browser
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(BIN)/.installed services
	$(BIN)/python -m bench $(BENCH_ARGS)
