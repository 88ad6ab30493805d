# Two commands do all the set-up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test lint typecheck pytest nginx servers chromium clean

# `taskd dev` imports devtools/ (never in the wheel) from this directory, the checkout.
run: $(STAMP) servers
	$(BIN)/taskd dev

test: $(STAMP) lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check taskd devtools tests
	$(BIN)/ruff format --check taskd devtools tests

typecheck: $(STAMP)
	$(BIN)/mypy taskd devtools

pytest: $(STAMP) nginx servers chromium
	$(BIN)/python -m pytest

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
