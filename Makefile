# quart-sse: `make run` serves on $APP_PORT (8080), `make test` runs the whole suite.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
COMPOSE ?= docker compose

.PHONY: run test lint audit bench bench-smoke build up down restart logs clean

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

bench: $(VENV)/.dev
	$(PY) -m bench all

bench-smoke: $(VENV)/.dev
	$(PY) -m bench smoke

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
