# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The BigQuery emulator the sink tests start: a venv of its own, never .venv (see
# tests/fakes/bigquery-emulator.txt). The tests find it at .venv-bq/bin/python, or at
# the interpreter named by BQ_EMULATOR_PYTHON.
BQ_VENV := .venv-bq
BQ_STAMP := $(BQ_VENV)/.installed
BQ_REQUIREMENTS := tests/fakes/bigquery-emulator.txt

.PHONY: run test lint typecheck pytest install bq-emulator clean bench examples lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

install: $(STAMP)

$(BQ_STAMP): $(BQ_REQUIREMENTS)
	$(PYTHON) -m venv $(BQ_VENV)
	$(BQ_VENV)/bin/pip install --quiet -r $(BQ_REQUIREMENTS)
	touch $(BQ_STAMP)

bq-emulator: $(BQ_STAMP)

## The main job on the embedded default: sample jobs -> worker -> simulator -> out/results.jsonl
run: $(STAMP)
	$(BIN)/worker run --config config/local.toml

## Lint, type-check, test.
test: lint typecheck pytest

lint: $(STAMP)
	$(BIN)/ruff check worker tests bench examples
	$(BIN)/ruff format --check worker tests bench examples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) $(BQ_STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

examples: $(STAMP)
	$(BIN)/python examples/make_examples.py

clean:
	rm -rf $(VENV) $(BQ_VENV) out .mypy_cache .pytest_cache .ruff_cache

## Regenerate requirements.lock: every runtime dependency pinned with hashes, for the
## container image (Dockerfile installs it with --require-hashes). Run after changing
## dependencies in pyproject.toml, and commit the result.
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet 'uv>=0.5'
	$(BIN)/uv pip compile pyproject.toml deploy/build-requirements.in --extra fast \
		--universal --python-version 3.11 --generate-hashes \
		--output-file requirements.lock
