# One command to run the demo, one to run the tests; each sets up .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo serve test lint services clients

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Third-party clients the end-to-end tests drive, each in a venv of its own.
DBGPT_CLIENT := .venv-clients/dbgpt
DBGPT_CLIENT_REQS := tests/e2e/clients/dbgpt-requirements.txt

# A venv whose pip cannot install (one left half-made) is built again, once.
$(DBGPT_CLIENT)/.installed: $(DBGPT_CLIENT_REQS)
	test -x $(DBGPT_CLIENT)/bin/python || $(PY) -m venv $(DBGPT_CLIENT)
	$(DBGPT_CLIENT)/bin/python -m pip install --quiet -r $(DBGPT_CLIENT_REQS) \
	  || { rm -rf $(DBGPT_CLIENT) && $(PY) -m venv $(DBGPT_CLIENT) \
	       && $(DBGPT_CLIENT)/bin/python -m pip install --quiet -r $(DBGPT_CLIENT_REQS); }
	touch $@

clients: $(DBGPT_CLIENT)/.installed

demo: $(STAMP)
	$(BIN)/convcore demo

serve: $(STAMP)
	$(BIN)/convcore serve $(if $(CONVCORE_API_KEYS),,--no-auth)

services:
	bash .ci/services

test: $(STAMP) services clients
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check convcore
	$(BIN)/mypy
