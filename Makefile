# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck pytest install clean bench examples lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,fast]'
	touch $(STAMP)

install: $(STAMP)

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

pytest: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/run.py

examples: $(STAMP)
	$(BIN)/python examples/make_examples.py

clean:
	rm -rf $(VENV) out .mypy_cache .pytest_cache .ruff_cache

## Regenerate requirements.lock: every runtime dependency pinned with hashes, for the
## container image (Dockerfile installs it with --require-hashes). Run after changing
## dependencies in pyproject.toml, and commit the result.
lock: $(STAMP)
	$(BIN)/python -m pip install --quiet 'uv>=0.5'
	$(BIN)/uv pip compile pyproject.toml deploy/build-requirements.in --extra fast \
		--universal --python-version 3.11 --generate-hashes \
		--output-file requirements.lock
