# computenet: the two commands a newcomer types are `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint unit integration e2e security bench clean install

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "computenet needs $(PYTHON) on PATH"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

## Run the whole network locally in the foreground (Ctrl-C stops it).
run: $(STAMP)
	$(BIN)/python -m deploy.localnet run

## ruff, then the rings of tests against the real RabbitMQ and PostgreSQL.
test: $(STAMP)
	$(BIN)/python -m deploy.localnet preflight --postgres postgresql://postgres@127.0.0.1:5432/postgres
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q tests/unit tests/integration tests/e2e tests/security

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e

## Attacks that must fail, each beside the legitimate path (tests/security).
security: $(STAMP)
	$(BIN)/python -m pytest -q tests/security

bench: $(STAMP)
	@for script in bench/bench_*.py; do echo "== $$script"; $(BIN)/python $$script || exit 1; done

clean:
	rm -rf var $(VENV)
