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

# Two pytest-xdist workers: the slow tests (marked, scheduled first, handed out one at a time)
# wait on Flower's 3 s polls much of their time, so two of them overlap well on 2 cores; more
# workers overload such a machine. `make test TEST_WORKERS=0` runs the suite in one process.
TEST_WORKERS ?= 2

test: $(BIN)/flwr
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist load --maxschedchunk 1

bench: $(BIN)/flwr
	$(BIN)/python scripts/bench_round.py
