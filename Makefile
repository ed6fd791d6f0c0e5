# Two entry points a new user needs; both create .venv on first use (scripts/setup.sh).
PY := .venv/bin/python
ROWS ?= 200000

.PHONY: setup demo test test-fast lint clean

setup:
	bash scripts/setup.sh

demo: setup
	$(PY) -m mpe.search --dataset criteo --synthetic $(ROWS) --out runs/demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

lint: setup
	$(PY) -m ruff check .

clean:
	rm -rf runs .pytest_cache
