# cascade-gateway — `make run` starts the stack, `make test` runs every check.
# Needs only Python >= 3.11 and make: the first run installs uv (into .tools/) and the locked
# dependencies (into .venv/); later runs skip both unless pyproject.toml or uv.lock changed.

PYTHON ?= python3
VENV := .venv
TOOLS := .tools
UV := $(TOOLS)/bin/uv
UV_VERSION := 0.13.9
STAMP := $(VENV)/.installed
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.PHONY: install run test lint typecheck unit bench format clean

install: $(STAMP)

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python $(PYTHON) --quiet
	@touch $(STAMP)

run: install
	$(VENV)/bin/cascade-gateway dev

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy

test: lint typecheck
	$(VENV)/bin/pytest

unit: install
	$(VENV)/bin/pytest tests/unit

bench: install
	$(VENV)/bin/python -m bench

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf .data .mypy_cache .ruff_cache .pytest_cache .hypothesis
