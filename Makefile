# bluestream: two commands do everything on a fresh machine.
#   make demo   - set up, start a local Kafka broker, run the daemon on the embedded store,
#                 publish a few runs and read them back through the catalog
#   make test   - set up, start Kafka + the MongoDB-wire server, lint, type-check, run pytest

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck bench bench-quick fuzz services-up services-down clean lock

$(STAMP): pyproject.toml requirements.lock
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	scripts/demo

test: $(STAMP)
	scripts/run-tests

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict src/

bench: $(STAMP)
	scripts/run-bench

bench-quick: $(STAMP)
	scripts/run-bench --quick

# The long fuzz run (needs the services: `make services-up`): 10^6 mutants through the
# Ingestor, 2*10^4 through the daemon on Kafka; -rP prints each run's outcome counts.
fuzz: $(STAMP)
	BLUESTREAM_FUZZ_MESSAGES=1000000 BLUESTREAM_FUZZ_KAFKA_MESSAGES=20000 \
	  $(PY) -m pytest -p no:cacheprovider -q -rP tests/test_fuzz.py

services-up:
	scripts/services up

services-down:
	scripts/services down

# Regenerate the lock after changing dependencies in pyproject.toml.
lock: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip freeze --exclude-editable | grep -v '^bluestream' > requirements.lock

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
