# The README's two commands are `make demo` and `make test`; both set everything up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup up down status demo test bench eval clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m stack install
	touch $(STAMP)

setup: $(STAMP)

up: setup
	$(PY) -m stack up

down:
	$(PY) -m stack down

status:
	$(PY) -m stack status

demo: setup
	$(PY) -m demo $(DEMO_ARGS)

test: up
	$(PY) -m pytest $(PYTEST_ARGS)

bench: up
	$(PY) benchmarks/bench.py $(BENCH_ARGS)

eval: up
	$(PY) -m demo.evaluate $(EVAL_ARGS)
