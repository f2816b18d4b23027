# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test lint typecheck unit loops demo demo-threads bench soak server clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is needed (found " + sys.version.split()[0] + "); run: make PYTHON=python3.11 ...")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	@# An older checkout installed the project under the name 'broker'.
	@$(BIN)/python -m pip uninstall --quiet --yes broker >/dev/null 2>&1 || true
	@echo "Installing the project, Celery, pytest and the embedded test server into $(VENV)."
	@echo "The first time this downloads about 70 MB for the server alone (ArcadeDB with its own Java runtime)."
	$(BIN)/python -m pip install --progress-bar on -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check broker tests examples benchmarks
	$(BIN)/ruff format --check broker tests examples benchmarks

typecheck: install
	$(BIN)/mypy --strict broker

unit: install
	$(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck unit

# The tests of other loops and ways to drive them, and of what attempts to
# break the broker found, e.g. on another Python:
# make loops PYTHON=python3.13 VENV=.venv-3.13
loops: install
	$(BIN)/pytest -m "loops or hardening" $(PYTEST_ARGS)

demo: install
	$(BIN)/python examples/celery_demo.py

demo-threads: install
	$(BIN)/python examples/threads_demo.py

bench: install
	$(BIN)/python -m benchmarks

soak: install
	$(BIN)/python -m tests.soak

server: install
	$(BIN)/python -m broker.testing.server $(SERVER_ARGS)

clean:
	rm -rf $(VENV) .venv-* .pytest_cache .mypy_cache .ruff_cache .hypothesis
