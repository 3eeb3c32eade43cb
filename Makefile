# The two commands a newcomer needs (see README.md). Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: demo test test-slow install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Runtime install (what `make demo` needs).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# Test install adds torch (CPU build 2.13.0), transformers, pytest, ...
$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The shipped model on the bundled test split under every method and budget: table, JSON/CSV, plot.
demo: $(VENV)/.installed
	$(BIN)/python eval.py --outdir=outputs/demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-slow: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
