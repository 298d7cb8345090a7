# Two commands: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/demo
DATA_DIR ?= data

.PHONY: demo test lint install install-test clean

$(BIN)/python:
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# The stamp files re-run pip only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/vlretrieval demo --config configs/demo.py --workdir $(WORKDIR) --data_dir $(DATA_DIR)

# Test processes (pytest-xdist): CI's two cores; each holds its own JAX runtime (about 4 GB).
TEST_WORKERS ?= 2

test: install-test
	$(BIN)/python -m pytest tests -n $(TEST_WORKERS)

# ruff's rules and line length are in pyproject.toml.
lint: install-test
	$(BIN)/ruff check .

clean:
	rm -rf $(WORKDIR)
