# Quick start: `make run` (set up, then a FedTAN simulation on the digits), `make test`.
# `make install` puts the `fedtan` command in $(VENV)/bin.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test lint bench

$(BIN)/flwr: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

install: $(BIN)/flwr

# --overwrite: each `make run` replaces the previous demo run's folder.
run: $(BIN)/flwr
	$(BIN)/fedtan run configs/digits.toml --overwrite

test: $(BIN)/flwr
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: $(BIN)/flwr
	$(BIN)/python scripts/bench_round.py
