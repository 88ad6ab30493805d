# Two commands do all the set-up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest test-cluster nginx servers bench bench-quick bench-tools chromium clean

# `taskd dev` imports devtools/ (never in the wheel) from this directory, the checkout.
run: $(STAMP) servers
	$(BIN)/taskd dev

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check taskd devtools tests bench
	$(BIN)/ruff format --check taskd devtools tests bench

typecheck: $(STAMP)
	$(BIN)/mypy taskd devtools bench

pytest: $(STAMP) nginx servers bench-tools chromium
	$(BIN)/python -m pytest

# Only the tests that start and break a private Redis Cluster (tests/test_cluster_tools.py).
test-cluster: $(STAMP) servers
	$(BIN)/python -m pytest -m cluster

# The benchmark (bench/run.py): prints a table, writes bench/results.json and docs/bench.png.
# Full: under 15 minutes on 2 cores; quick: smaller sizes, under 3 minutes.
bench: $(STAMP) servers bench-tools
	$(BIN)/python -m bench.run

bench-quick: $(STAMP) servers bench-tools
	$(BIN)/python -m bench.run --quick

# wrk and pgbench, the bench's load generators (tests/test_bench.py runs it on tiny sizes).
bench-tools:
	@sh scripts/ensure-bench-tools.sh

# tests/test_web.py drives Debian's chromium through Playwright (which never downloads one).
chromium:
	@sh scripts/ensure-chromium.sh

# tests/test_nginx.py runs deploy/nginx.conf through the machine's nginx.
nginx:
	@sh scripts/ensure-nginx.sh

# postgres/initdb and redis-server, for private servers when the configured ones do not answer.
servers:
	@sh scripts/ensure-servers.sh

# The virtualenv, with taskd installed in it (editable) and the test tools.
$(STAMP): pyproject.toml
	@sh scripts/ensure-python.sh $(PYTHON)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .dev .mypy_cache .ruff_cache *.egg-info
