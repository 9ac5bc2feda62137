# The README's two commands: `make run` and `make test`. Nothing clever.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: install browser run migrate test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[dev]'
	touch $@

install: $(BIN)/.installed

.env: | $(BIN)/.installed
	$(BIN)/asset-tracker init-env --path .env

migrate: install .env
	$(BIN)/alembic upgrade head

# Runs the Procfile's web and worker together on $(PORT); never `release` (that is `migrate`).
run: migrate
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/honcho start --port $(PORT) web worker

# tests/test_openapi.py renders /docs in headless Chromium: Debian's package, installed once.
browser:
	@test -x /usr/bin/chromium || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/alembic check

bench: install
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) instance .pytest_cache .mypy_cache .ruff_cache
