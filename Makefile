# Two commands do all the set-up on a fresh clone:
#   make run    start dynaconnd in the foreground on the bundled source.ini
#   make test   lint, type-check and run the whole test suite
# Each makes .venv and installs what it needs first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
RUN_DIR := $(CURDIR)/run
STATE_DIR := $(CURDIR)/state
PACKAGES := dynaconnd client/magenta_dynaconn
PYTEST_ARGS ?=

.PHONY: install run client test lint bench clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(INSTALLED)

run: $(INSTALLED)
	@# The bundled database is an empty SQLite file until an app adds tables.
	$(BIN)/python -c "import sqlite3; sqlite3.connect('my_db.sqlite3').close()"
	$(BIN)/dynaconnd --config source.ini \
		--socket $(RUN_DIR)/dynaconnd.sock \
		--authkey-file $(RUN_DIR)/authkey \
		--state-dir $(STATE_DIR)

client: $(INSTALLED)
	DYNACONN_SOCKET=$(RUN_DIR)/dynaconnd.sock \
	DYNACONN_AUTHKEY_FILE=$(RUN_DIR)/authkey \
		$(BIN)/python examples/client.py

lint: $(INSTALLED)
	$(BIN)/ruff check $(PACKAGES) tests bench examples
	$(BIN)/ruff format --check $(PACKAGES) tests bench examples
	$(BIN)/mypy --strict $(PACKAGES)

test: lint
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(INSTALLED)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) run state .mypy_cache .ruff_cache .pytest_cache
