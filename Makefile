# `make demo` and `make test` set everything up on a fresh machine, then run.
VENV ?= .venv
PYTHON ?= python3
# torch first, pinned: on a machine without CUDA, 2.13.0 is a CPU build from the local wheel cache
# (elsewhere pass TORCH="torch==2.13.0 --index-url <a CPU wheel index>" to avoid a CUDA download)
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install browser demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[dev,postgres,redis]"
	touch $(STAMP)

demo: install
	$(BIN)/autotune run examples/quickstart.yaml

# the report's test opens it in Debian's Chromium: installed here where missing and possible
APT := DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& echo "installing Debian's chromium for the report's browser test" \
		&& { $(APT) >/dev/null 2>&1 || { apt-get update -q >/dev/null && $(APT) >/dev/null; }; } \
		|| echo "note: no chromium here; the report's browser test will be skipped"; }

# one pytest process per core (pytest-xdist): most tests wait on processes they started, so on
# two cores the suite takes under half the time of one process (docs/benchmarks.md)
test: install browser
	$(BIN)/python -m pytest -q -n auto --dist worksteal

lint: install
	$(BIN)/ruff check autotune tests benchmarks
	$(BIN)/ruff format --check autotune tests benchmarks

clean:
	rm -rf runs .pytest_cache
