# Quick start: `make run` (set-up + the default digits job on the CPU), `make test` (set-up + suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip caps torch at the release cached on this kind of machine; elsewhere any torch>=2.3 works.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

run: setup
	$(BIN)/python run.py $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf outputs multirun .pytest_cache
