# Entremise — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/test

.PHONY: help install protos check-protos demo chromium test test-fast test-pg race kill fuzz dp-audit bench-small bench-sql bench-xl bench-spark bench bench-tumult bench-profile bench-prep lint typecheck format clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev,bench,spark]"
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install Entremise with its dev tools

protos: $(STAMP) ## Regenerate the committed protobuf/gRPC code from proto/
	PYTHON=$(BIN)/python ./scripts/gen_protos.sh

check-protos: $(STAMP) ## Fail if the committed generated code differs from the .proto files
	$(BIN)/pytest -q tests/test_protos.py

demo: $(STAMP) ## Run the whole job on SQLite; leaves demo-workdir/report/report.html to open
	rm -rf demo-workdir
	$(BIN)/entremise demo --workdir demo-workdir

test: $(STAMP) chromium ## Run the test suite (SQLite; PostgreSQL too when reachable)
	$(BIN)/pytest

test-fast: $(STAMP) ## Domain, store-contract and architecture tests on the in-memory store (no gRPC, no database; under 30 s)
	$(BIN)/pytest -q -p no:cacheprovider tests/test_domain.py tests/test_store_contract.py \
		tests/test_architecture.py tests/test_privacy.py tests/test_upload_validation.py -k "not sqlite and not postgres"

# The report's browser test renders report.html in Debian's chromium (Playwright's own browser
# download does not work here). Without apt-get that one test skips, saying why.
CHROMIUM := /usr/bin/chromium

chromium: ## Install Debian's chromium if missing (apt-get, as root) for the report's browser test
	@if [ -x $(CHROMIUM) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt-get) for the report's browser test"; \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else echo "chromium: $(CHROMIUM) missing and no apt-get: the report's browser test will skip"; fi

test-pg: $(STAMP) ## Run the suite and require PostgreSQL (PG_URL=...)
	ENTREMISE_TEST_PG_URL=$(PG_URL) ENTREMISE_REQUIRE_PG=1 $(BIN)/pytest

race: $(STAMP) ## Budget race: 64 concurrent releases, budget for 10, on SQLite and PostgreSQL (JSON)
	$(BIN)/python -m bench.race

kill: $(STAMP) ## Crash test: SIGKILL the hub mid-upload/mid-release 8 times, check invariants (JSON)
	$(BIN)/python -m bench.kill --rounds 8

load: $(STAMP) ## Load: 1, 8, 32, 64 analysts over 2 agreements at M, 60 s each (an upload meanwhile at 32), hub under --memory-limit 4GB (JSON; ~7 min, not in CI)
	$(BIN)/python -m bench.load --size M --levels 1,8,32,64 --duration 60 --memory-limit 4GB --upload-at 32 --out bench/results/load-M.json

load-small: $(STAMP) ## Load, short (CI): 1 and 8 analysts over 2 agreements at S, 8 s each, hub under --memory-limit 1GB (JSON)
	$(BIN)/python -m bench.load --size S --levels 1,8 --duration 8 --memory-limit 1GB --upload-at 8

bench-sql: $(STAMP) ## What DP SQL adds before a query runs (sqlglot + planner vs the mini-language; target < 5 ms)
	$(BIN)/python -m bench.sql_planning --runs 200

bench-xl: $(STAMP) ## XL: 10M bank rows, 100M purchases, hub under --memory-limit 6GB; walls and peak RSS per process (JSON; ~6 GB of disk, not in CI)
	$(BIN)/python -m bench.xl --hub-memory 6GB --out bench/results/XL.json

bench-spark: $(STAMP) ## DuckDB vs Spark local[2] engines on the same plans at size S (JSON)
	$(BIN)/python -m bench.spark_engine --size S --runs 3

bench-prep: $(STAMP) ## Partner-side preparation of a 2M-row CSV: streamed on 1 and all cores vs hmac.new and a pyarrow read (JSON)
	$(BIN)/python -m bench.partner_prep --rows 2000000 --runs 3

bench-small: $(STAMP) ## Stage benchmarks vs in-process baselines at size S (JSON, then a table)
	$(BIN)/python -m bench.pipeline --size S --runs 5 --end-to-end

bench: $(STAMP) ## Stages 1-5 at M and L, stage 6 (Tumult) at M; writes bench/RESULTS.md (~40 min)
	$(BIN)/python -m bench.pipeline --size M --runs 5 --out bench/results/M.json
	$(BIN)/python -m bench.pipeline --size L --runs 5 --end-to-end --out bench/results/L.json
	$(MAKE) bench-tumult
	$(BIN)/python -m bench.report

TUMULT_VENV := .venv-tumult
TUMULT_STAMP := $(TUMULT_VENV)/.installed

$(TUMULT_STAMP): bench/requirements-tumult.txt
	test -x $(TUMULT_VENV)/bin/python || $(PYTHON) -m venv $(TUMULT_VENV)
	$(TUMULT_VENV)/bin/pip install --quiet --upgrade pip
	$(TUMULT_VENV)/bin/pip install --quiet -r bench/requirements-tumult.txt
	@touch $(TUMULT_STAMP)

bench-profile: $(STAMP) ## py-spy profile (all threads) of the end-to-end run at M: bench/results/profile-M.txt
	@mkdir -p .build
	$(BIN)/py-spy record --subprocesses --rate 50 --format raw --output .build/profile-M.raw -- \
		$(BIN)/python -m bench.pipeline --size M --runs 1 --end-to-end-only
	$(BIN)/python -m bench.profile .build/profile-M.raw > bench/results/profile-M.txt

# Tumult takes 40-80 s per query at M: a warm-up and one timed run of each of the ten queries
# already take ~15 minutes, and its ratio to ours is far beyond the run-to-run spread.
TUMULT_RUNS ?= 1

bench-tumult: $(TUMULT_STAMP) ## Stage 6: the same DP queries in Tumult Analytics on Spark, size M (own venv)
	$(TUMULT_VENV)/bin/python -m bench.tumult --size M --runs $(TUMULT_RUNS) --out bench/results/tumult-M.json

fuzz: $(STAMP) ## Hostile input against every RPC of a real hub and the file readers (JSON)
	$(BIN)/python -m bench.fuzz --examples 300

dp-audit: $(STAMP) ## Adversarial neighbouring datasets through gRPC and empirical epsilon, long run (JSON)
	$(BIN)/python -m bench.privacy_audit --pairs 60 --releases 200000 --keys 400000

lint: $(STAMP) ## Ruff and strict mypy
	$(BIN)/ruff check proto/entremise server partners privacy cli sdk tests bench scripts
	$(MAKE) typecheck

typecheck: $(STAMP) ## Strict mypy over the entremise package
	@rm -rf .build/typecheck && mkdir -p .build/typecheck/entremise
	@cp proto/entremise/__init__.py proto/entremise/py.typed .build/typecheck/entremise/
	@for p in v1:proto/entremise/v1 server:server partners:partners privacy:privacy cli:cli sdk:sdk; do \
		ln -s "$$PWD/$${p#*:}" ".build/typecheck/entremise/$${p%%:*}"; done
	cd .build/typecheck && ../../$(BIN)/mypy --config-file ../../pyproject.toml -p entremise

format: $(STAMP) ## Apply ruff's fixes and formatting
	$(BIN)/ruff check --fix proto/entremise server partners privacy cli sdk tests bench scripts
	$(BIN)/ruff format proto/entremise/__init__.py server partners privacy cli sdk tests bench scripts

clean: ## Remove the venv and caches
	rm -rf $(VENV) .build .mypy_cache .ruff_cache .pytest_cache
