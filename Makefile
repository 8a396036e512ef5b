# Quick start: `make run` (set-up + the default digits job on the CPU), `make test` (set-up + suite).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pip caps torch at the release cached on this kind of machine; elsewhere any torch>=2.3 works.
TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: setup run test lint clean data

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

# Fashion-MNIST's four official IDX files into /usr/share/datasets/fashion-mnist (Debian's package).
data:
	@if command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y dataset-fashion-mnist || sudo apt-get install -y dataset-fashion-mnist; \
	else \
		echo "no apt-get here: put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"; \
		echo "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (from"; \
		echo "https://github.com/zalandoresearch/fashion-mnist) in data/FashionMNIST/raw/,"; \
		echo "or run on a machine with network access (runtime.download=true, the default)"; \
		exit 1; \
	fi

clean:
	rm -rf outputs multirun .pytest_cache
