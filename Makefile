# Quick start: `make run` (set up, then a FedTAN simulation on the digits), `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench

$(BIN)/flwr: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: $(BIN)/flwr
	PATH=$(CURDIR)/$(BIN):$$PATH scripts/run_simulation.sh configs/digits.toml 5

test: $(BIN)/flwr
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(BIN)/flwr
	$(BIN)/python scripts/bench_round.py
