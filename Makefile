# Single entry point: install, test, lint, demo, bench.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-demo test test-fast lint demo bench clean compat

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

$(VENV)/.demo-installed: $(VENV)/.installed
	$(PIP) install -q -e ".[demo]"
	touch $@

install-demo: $(VENV)/.demo-installed

test: install
	$(PY) -m pytest -q -rs tests

lint: install
	$(PY) -m ruff check peft tests examples benchmarks

# ARGS, e.g. ARGS="--methods lora,loha,vera" (python examples/demo_bbc_minilm.py --help)
demo: install-demo
	$(PY) examples/demo_bbc_minilm.py $(ARGS)

bench: install-demo
	$(PY) benchmarks/run_all.py

# upstream PEFT 0.21.2's own tests (fetched at run time) against this package: docs/compat.md. Not part of `test`.
# ARGS, e.g. ARGS="--file test_custom_models.py --grep DoRA" (python -m compat.run --help)
$(VENV)/.compat-installed: $(VENV)/.installed setup.py
	$(PIP) install -q -e ".[compat]"
	touch $@

compat: $(VENV)/.compat-installed
	$(PY) -m compat.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
