# Two commands for a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip
export PYTHONUNBUFFERED := 1

# The server tests that run a second time with SDSERVE_BATCHING=step (test_stepper.py builds its
# batchers itself: it runs once).
SERVER_TESTS := tests/unit/test_api.py tests/unit/test_api_security.py tests/unit/test_steps.py tests/unit/test_edits.py tests/unit/test_lora.py tests/unit/test_jobs.py tests/unit/test_jobs_replicas.py tests/unit/test_stream.py \
	tests/integration/test_server_lifecycle.py tests/integration/test_server_load.py \
	tests/integration/test_server_redis.py tests/integration/test_observability.py

.PHONY: demo test unit integration e2e soak install system-deps crd bench lint format clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Python packages: torch (CPU wheel here, ~200 MB) and everything the tests use.
.stamp-python: pyproject.toml | $(BIN)/python
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	touch $@

# Real services the tests talk to: Debian's redis-server, prometheus (promtool) packages.
.stamp-system:
	@if ! command -v redis-server >/dev/null || ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq redis-server prometheus >/dev/null; \
	fi
	@command -v redis-server >/dev/null && command -v promtool >/dev/null && command -v prometheus >/dev/null
	touch $@

install: .stamp-python .stamp-system

crd: .stamp-python
	$(BIN)/sdop crd > crds/stablediffusionservices.sdop.io.yaml
	cp crds/stablediffusionservices.sdop.io.yaml charts/sdop/crds/

# The main job with no cluster: render every example, then serve the built-in tiny model and
# generate images through the HTTP API (request batching, step batching of a mix, a stream).
demo: install
	@mkdir -p demo-output
	@for f in examples/*.yaml; do \
	  echo "== sdop render -f $$f"; $(BIN)/sdop render -f $$f > demo-output/$$(basename $$f .yaml).rendered.yaml || exit 1; \
	  grep '^kind:' demo-output/$$(basename $$f .yaml).rendered.yaml | sort | uniq -c; \
	done
	$(BIN)/python -m sdserve.demo --out demo-output

# Guardrails: formatting, lint, types and the layer contracts. Any violation fails `make test`.
lint: .stamp-python
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: .stamp-python
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two pytest workers (pytest-xdist), one per core; each test file stays on one worker, so its
# module fixtures (a test API server, an sdserve process) are shared. One torch thread per
# process: two workers and the sdserve processes they start would otherwise oversubscribe the
# cores, each OpenMP thread spinning while it waits for the others.
TEST_RUN := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: install lint
	$(TEST_RUN)
	# The server tests again with step-level batching (request-level is the default above).
	SDSERVE_BATCHING=step $(TEST_RUN) $(SERVER_TESTS)

unit: .stamp-python
	$(BIN)/python -m pytest -q tests/unit

e2e: install
	$(BIN)/python -m pytest -q --run-e2e tests/e2e

# Minutes of random load on real servers, both batching policies (SDOP_SOAK_SECONDS, default 60 per test).
soak: install
	$(BIN)/python -m pytest -q --run-soak --timeout 900 tests/soak

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .stamp-* demo-output
