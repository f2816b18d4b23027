# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-neo4j test-neo4j-current lint typecheck unit loops demo demo-threads bench soak server clean

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

# The whole suite against a real Neo4j Community (5.26 LTS) instead of ArcadeDB.
# Needs java (17+) and mvn; Neo4j is built once into ~/.cache/neo4j-loop-broker.
test-neo4j: install
	BROKER_TEST_SERVER=neo4j $(BIN)/pytest $(PYTEST_ARGS)

# A few real-server tests on the current Neo4j release, which needs Java 21+:
# make test-neo4j-current NEO4J_JAVA_HOME=/path/to/jdk-21-or-later
NEO4J_JAVA_HOME ?= $(JAVA_HOME)
NEO4J_CURRENT_TESTS ?= tests/test_neo4j_only.py tests/test_neo4j_server.py
test-neo4j-current: install
	JAVA_HOME=$(NEO4J_JAVA_HOME) BROKER_TEST_SERVER=neo4j BROKER_TEST_NEO4J_VERSION=current \
		$(BIN)/pytest $(NEO4J_CURRENT_TESTS) $(PYTEST_ARGS)

# The tests of other loops and ways to drive them, and of what attempts to
# break the broker found, e.g. on another Python:
# make loops PYTHON=python3.13 VENV=.venv-3.13
loops: install
	$(BIN)/pytest -m "loops or hardening" $(PYTEST_ARGS)

# make demo SERVER=neo4j runs it on a real Neo4j Community (needs java and mvn).
demo: install
	$(if $(SERVER),BROKER_TEST_SERVER=$(SERVER) )$(BIN)/python examples/celery_demo.py

demo-threads: install
	$(BIN)/python examples/threads_demo.py

# make bench SERVER=neo4j runs them on a real Neo4j Community.
bench: install
	$(if $(SERVER),BROKER_TEST_SERVER=$(SERVER) )$(BIN)/python -m benchmarks

soak: install
	$(BIN)/python -m tests.soak

server: install
	$(BIN)/python -m broker.testing.server $(if $(SERVER),--server $(SERVER) )$(SERVER_ARGS)

clean:
	rm -rf $(VENV) .venv-* .pytest_cache .mypy_cache .ruff_cache .hypothesis
