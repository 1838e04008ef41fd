# Edgefleet: `make demo` runs the product, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export EDGEFLEET_CACHE ?= $(HOME)/.cache/edgefleet
ARGS ?=

# What the suite talks to: the machine's own services on loopback.
TEST_ENV := DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/edgefleet \
	REDIS_URL=redis://127.0.0.1:6379/15 \
	MQTT_URL=mqtt://127.0.0.1:1883 \
	DATABASE_CONN_MAX_AGE=0 \
	DEBUG=true \
	DJANGO_SETTINGS_MODULE=controlplane.settings

.PHONY: help venv models services test test-arm64 lint demo clean bench bench-quick cluster

help:
	@echo "make demo   run the plane, a bridge, a worker and one agent with a real model (ARGS=--once to exit)"
	@echo "make test   install what is needed and run the whole suite against PostgreSQL, Redis, Mosquitto"
	@echo "make test-arm64  the real agent on an emulated Linux aarch64 (qemu) against the plane; needs root"
	@echo "make lint   ruff, mypy, import contracts, the migrations check, docker/ files, agent wheels for every device platform"
	@echo "make cluster  gunicorn, 3 bridges, 2 workers and the simulator as processes; figures in var/cluster.md"
	@echo "make bench  run the benchmarks (over 10 minutes) and write docs/benchmarks.md; bench-quick: about three minutes"

$(VENV)/.installed: requirements/agent.txt requirements/plane.txt requirements/dev.txt pyproject.toml client/pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is needed: install python3.11 (or set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements/dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip install --quiet --no-deps -e ./client  # the client and CLI; dev.txt pins what they need
	touch $@

venv: $(VENV)/.installed

models: venv
	PIP=$(VENV)/bin/pip bash scripts/fetch-models.sh

services:
	bash scripts/ensure-services.sh

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	# django-stubs loads the settings, which need a SECRET_KEY outside DEBUG.
	SECRET_KEY=type-check-only $(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(TEST_ENV) DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres $(PY) manage.py makemigrations --check --dry-run
	$(VENV)/bin/docker-compose -f docker/compose.yaml --env-file docker/.env.example config --quiet
	$(VENV)/bin/hadolint docker/Dockerfile.plane docker/Dockerfile.agent
	PIP=$(VENV)/bin/pip bash scripts/check-agent-wheels.sh

test: venv models services lint
	$(TEST_ENV) $(VENV)/bin/pytest

# The agent inside an emulated Debian arm64 root (qemu-user), against a plane, bridge and broker
# on this host (docs/agent.md). The root is built once into $(EDGEFLEET_CACHE)/arm64 and rebuilt
# when requirements/agent.txt changes. Needs root: debootstrap, chroot, mount.
test-arm64: venv models services
	root=$$(bash scripts/arm64/root.sh) && $(TEST_ENV) EDGEFLEET_ARM64_ROOT=$$root $(VENV)/bin/pytest tests/e2e/test_arm64.py

demo: venv models
	$(PY) scripts/demo.py $(ARGS)

clean:
	rm -rf var .pytest_cache

# Benchmarks: their own database, broker and Redis index; figures go to docs/benchmarks.md.
BENCH_ENV := BENCH_ADMIN_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres \
	BENCH_REDIS_URL=redis://127.0.0.1:6379/14

bench: venv models services
	$(BENCH_ENV) $(PY) -m bench.run

bench-quick: venv models services
	$(BENCH_ENV) $(PY) -m bench.run --quick

# The plane scaled out without Docker: gunicorn, 3 bridges, 2 Celery workers and the simulator (docs/scaling.md).
cluster: venv services
	$(BENCH_ENV) $(PY) -m bench.run --only cluster --out var/cluster.md $(ARGS)
