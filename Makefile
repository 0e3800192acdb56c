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

.PHONY: install tools run test lint typecheck unit bench bench-ab bench-peers chaos format clean

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

# promtool (Debian's prometheus package) checks the chart's alert rules. Best effort: where it
# cannot be installed, the chart tests skip exactly those checks and say so.
tools:
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; }; }; } || \
	  echo "promtool is not available: the alert-rule checks will be skipped"
# chromium (Debian's) renders the cohort report's HTML page in its test, driven by playwright
# without a browser download. Best effort too: where it cannot be installed, that test skips.
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	    { timeout 300 apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium is not available: the report page's browser test will be skipped"

test: tools lint typecheck
	$(VENV)/bin/pytest

unit: install
	$(VENV)/bin/pytest tests/unit

bench: install
	$(VENV)/bin/python -m bench

# Every fault at once on the whole stack (1,000 withdrawals; CHAOS_WITHDRAWALS, CHAOS_RATE).
chaos: install
	$(VENV)/bin/python -m bench chaos

# Ours against the same cascade on Temporal and on DBOS (bench/peers/). The peers group is
# installed here and never by `make install`; the next `make install` removes it again.
bench-peers: install
	$(UV) sync --frozen --group peers --python $(PYTHON) --quiet
	$(VENV)/bin/python -m bench peers

# The cascade benchmark on BASE (a commit) and on this checkout, alternately, in one run.
bench-ab: install
	@test -n "$(BASE)" || { echo "usage: make bench-ab BASE=<commit>"; exit 2; }
	$(VENV)/bin/python -m bench.ab $(BASE)

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf .data .mypy_cache .ruff_cache .pytest_cache .hypothesis
