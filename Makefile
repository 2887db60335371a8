# `make demo` and `make test` set everything up on a fresh machine, then run.
VENV ?= .venv
PYTHON ?= python3
# torch first, pinned: on a machine without CUDA, 2.13.0 is a CPU build from the local wheel cache
# (elsewhere pass TORCH="torch==2.13.0 --index-url <a CPU wheel index>" to avoid a CUDA download)
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,postgres,redis]"
	touch $(STAMP)

demo: install
	$(BIN)/autotune run examples/quickstart.yaml

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check autotune tests benchmarks
	$(BIN)/ruff format --check autotune tests benchmarks

clean:
	rm -rf runs .pytest_cache
