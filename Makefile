# quart-sse: `make run` serves on $APP_PORT (8080), `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
COMPOSE ?= docker compose

.PHONY: run test lint audit bench bench-storm bench-ceiling bench-smoke bench-peer build up down restart logs clean

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

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# known vulnerabilities in the runtime requirements (needs the PyPI JSON API or OSV to be reachable)
audit: $(VENV)/.dev
	bash .ci/audit

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
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
