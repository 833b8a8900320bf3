# quart-sse: `make run` serves on $APP_PORT (8080), `make test` runs the whole suite.
# PYTHON and VENV pick the interpreter and its venv: `make test-3.12` is `make test` on Python 3.12 in .venv-3.12.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
COMPOSE ?= docker compose
SUPPORTED := 3.11 3.12 3.13
# the stream tests CI runs once more on the generator path (STREAM_HANDOFF=false); tests that only make sense
# with the hand-off skip themselves there (marker `handoff`)
STREAM_TESTS := tests/test_handoff.py tests/test_stream_e2e.py tests/test_slow_consumer.py \
	tests/test_limits_disconnect.py tests/test_crash_shutdown.py tests/test_resume.py tests/test_resume_property.py \
	tests/test_churn.py tests/test_multi_instance.py tests/test_tenant_isolation.py tests/test_faults_redis.py \
	tests/test_http_edges.py tests/test_adapter.py tests/test_vanished_client.py

.PHONY: run test test-fast test-all test-generator lint audit bench bench-storm bench-ceiling bench-smoke bench-peer wheel \
	build up down restart logs clean

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt requirements.txt $(VENV)/.runtime
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

.env:
	cp .env.example .env

run: $(VENV)/.runtime .env
	$(PY) -m quart_sse serve

test: $(VENV)/.dev
	$(PY) -m pytest -q

# no server, no Redis, no child process: seconds (tests/tiers.py decides which tests those are)
test-fast: $(VENV)/.dev
	$(PY) -m pytest -q -m fast

# the whole suite on one supported Python, in its own venv: make test-3.12
test-3.%:
	@py=$$(.ci/pythons 3.$*) || { echo "Python 3.$* not found (pyenv, python3.$* on PATH)"; exit 1; }; \
	$(MAKE) --no-print-directory test PYTHON=$$py VENV=.venv-3.$*

# the whole suite on every supported Python this machine has (a missing one is said, not skipped silently)
test-all:
	@for v in $(SUPPORTED); do \
	  py=$$(.ci/pythons $$v) || { echo "test-all: Python $$v MISSING on this machine: the suite does not run on it"; continue; }; \
	  echo "test-all: Python $$v ($$py)"; \
	  $(MAKE) --no-print-directory test PYTHON=$$py VENV=.venv-$$v || exit 1; \
	done

# the stream tests on the generator path
test-generator: $(VENV)/.dev
	STREAM_HANDOFF=false $(PY) -m pytest -q $(STREAM_TESTS)

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# known vulnerabilities in the runtime requirements (needs the PyPI JSON API or OSV to be reachable)
audit: $(VENV)/.dev
	VENV=$(VENV) bash .ci/audit

# every scenario against ours, the naive baseline and nginx+nchan (when installed: make bench-peer), then the
# ceiling of one Redis primary; server pinned to CPU 0, load generator to CPU 1 (see docs/performance.md)
BENCH_PIN ?= --server-cpu 0 --client-cpu 1

bench: $(VENV)/.dev
	$(PY) -m bench all $(BENCH_PIN)
	$(PY) -m bench ceiling $(BENCH_PIN)

# reconnect storms as in docs/performance.md: 5,000 and 19,000 clients at once, fresh then resuming
bench-storm: $(VENV)/.dev
	$(PY) -m bench storm --streams 5000 $(BENCH_PIN)
	$(PY) -m bench storm --streams 19000 $(BENCH_PIN)

bench-ceiling: $(VENV)/.dev
	$(PY) -m bench ceiling $(BENCH_PIN) --batch 100

bench-smoke: $(VENV)/.dev
	$(PY) -m bench smoke

# the reference peer: Debian's nginx-light + nchan module (needs root and apt)
bench-peer:
	command -v nginx >/dev/null 2>&1 && test -f /usr/share/nginx/modules/ngx_nchan_module.so || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	   nginx-light libnginx-mod-nchan)

# the installable package (README: Install): dist/quart_sse-<version>-py3-none-any.whl
wheel: $(VENV)/.runtime
	$(PY) -m pip wheel -q --no-deps -w dist .

# --- containers (the seed's targets) ---
build: .env
	$(COMPOSE) build

up: .env
	$(COMPOSE) up -d

down:
	$(COMPOSE) down

restart:
	$(COMPOSE) restart

logs:
	$(COMPOSE) logs -f

clean:
	rm -rf $(VENV) .venv-3.* .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
