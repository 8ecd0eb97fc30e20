# Tadpole: `make run` starts everything, `make test` runs every test.
# Both set up .venv/ from this repo's own files first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
PORT ?=
STAMP := $(VENV)/.installed

.PHONY: run test unit integration e2e lint typecheck bench bench-startup bench-workflows bench-sagas schemas clean help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP) ## start everything (PORT=9000 for another port; else TADPOLE_PORT / ORHESTRA_PORT / 8080)
	$(BIN)/tadpole up $(if $(PORT),--port $(PORT))

test: $(STAMP) ## lint, type-check, then unit, integration and end-to-end tests
	$(BIN)/ruff check .
	$(BIN)/mypy .
	$(BIN)/python -m pytest -q -p no:cacheprovider; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

unit: $(STAMP) ## only the fast unit tests
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP) ## only the integration tests
	$(BIN)/python -m pytest -q tests/integration

e2e: $(STAMP) ## only the end-to-end tests
	$(BIN)/python -m pytest -q tests/e2e

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy .

schemas: $(STAMP) ## regenerate schemas/avro/*.avsc from the event classes
	$(BIN)/tadpole schemas --write

PEERS := bench/.venv-peers
$(PEERS)/.installed: bench/requirements-peers.txt
	@test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet -r bench/requirements-peers.txt
	@touch $@

bench: $(STAMP) $(PEERS)/.installed ## benchmark Tadpole beside PgQueuer and DBOS (bench/results/latest.json)
	$(BIN)/python bench/run.py

bench-workflows: $(STAMP) $(PEERS)/.installed ## 3-step workflows, 24 workers: runs/s and step-to-step latency beside DBOS (bench/results/workflows-<date>.json)
	$(BIN)/python bench/workflows.py

bench-sagas: $(STAMP) $(PEERS)/.installed ## agent-spawning sagas/s end to end, clean and with 20% of register steps failing, beside DBOS (bench/results/sagas-<date>.json)
	$(BIN)/python bench/sagas.py

bench-startup: $(STAMP) ## start-up to healthy and the API's memory, 1,000 vs 100,000 finished jobs (bench/results/startup-<date>.json)
	$(BIN)/python bench/startup.py

clean:
	rm -rf $(VENV) bench/.venv-peers
