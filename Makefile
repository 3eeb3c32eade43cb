# The two commands a newcomer needs (see README.md). Each creates .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
TEST_WORKERS ?= 2

.PHONY: demo test test-slow test-lmms install install-test clean

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

# lmms-eval's comparison tests (metrics, prompts, the vtr_jax lmms-eval model). lmms-eval 0.7 requires unpinned
# torch/torchvision, av and much else, so it lives in its own environment layered on the test one: installed
# without its requirements, with the small modules its evaluator and task code import (pinned; filelock < 4
# because lmms-eval 0.7.3 patches filelock 3's internals). The test environment itself never sees lmms-eval.
LMMS_VENV := $(VENV)/lmms
LMMS_PACKAGES := lmms-eval==0.7.3 accelerate==1.15.0 aiohappyeyeballs==2.7.1 aiohttp==3.14.5 aiosignal==1.4.0 \
	certifi==2026.10.19.post1 chardet==7.7.0 charset-normalizer==3.5.3 colorama==0.4.6 DataProperty==1.1.1 \
	evaluate==0.4.6 filelock==3.32.7 frozenlist==1.8.0 loguru==0.7.3 lxml==6.1.3 mbstrdecoder==1.1.5 \
	multidict==7.2.1 pathvalidate==3.3.1 portalocker==4.4.2 propcache==0.5.4 pytablewriter==1.2.1 pytz==2026.6 \
	requests==2.34.2 sacrebleu==2.6.0 tabledata==1.3.5 tabulate==0.10.0 tcolorpy==0.1.7 tenacity==9.2.1 \
	typepy==2.0.0 urllib3==2.8.0 yarl==1.25.1
LMMS_TESTS := tests/test_lmms.py tests/test_metrics.py tests/test_tasks.py::test_prompts_and_generation_settings_equal_lmms_eval

$(LMMS_VENV)/.installed: $(VENV)/.installed-test Makefile
	$(BIN)/python -m venv $(LMMS_VENV)
	base=$$($(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	own=$$($(LMMS_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	echo "import site; site.addsitedir('$$base')" > $$own/_vtr_jax_test_env.pth
	$(LMMS_VENV)/bin/python -m pip install -q --no-deps $(LMMS_PACKAGES)
	touch $@

test-lmms: $(LMMS_VENV)/.installed
	$(LMMS_VENV)/bin/python -m pytest -q -m "slow or not slow" $(LMMS_TESTS) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
