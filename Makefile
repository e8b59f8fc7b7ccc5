# The two commands: `make run` (everything, on this machine) and `make test` (the whole suite).
# Both create .venv and install what they need themselves.

PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: run test lint firmware-test bench bench-ingest bench-payment soak clean help

help:
	@echo "make run    - start the whole system (web, MQTT worker, Celery, Mosquitto, Redis)"
	@echo "make test   - run the test suite (pytest, firmware host tests, ruff)"
	@echo "make bench  - run the benchmarks under bench/"
	@echo "make soak   - the money simulation over many seeds (SEEDS=200)"

$(STAMP): requirements.txt requirements-dev.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	@touch $(STAMP)

# A fresh SECRET_KEY and fresh passwords for the backend's broker users (`make run`'s broker
# refuses anonymous clients); .env is read under the environment by every process.
.env: .env.example
	@if [ ! -f .env ]; then \
		new() { $(PYTHON) -c 'import secrets; print(secrets.token_urlsafe('$$1'))'; }; \
		sed -e "s|^SECRET_KEY=.*|SECRET_KEY=$$(new 50)|" -e "s|dev-ingest-password|$$(new 24)|" \
			-e "s|dev-publisher-password|$$(new 24)|" .env.example > .env; \
		echo "Created .env from .env.example (edit it to configure)"; \
	fi

# Every step reads .env under the environment (the settings do; bin/start-all for honcho).
run: $(STAMP) .env
	@bin/ensure-system-deps
	@mkdir -p var
	$(BIN)/python manage.py migrate --noinput
	$(BIN)/python manage.py collectstatic --noinput --verbosity 0
	$(BIN)/python manage.py seed_demo
	$(BIN)/python manage.py mqtt_auth from-settings
	@bin/dev-ca var/mosquitto/tls
	@rm -rf var/prometheus && mkdir -p var/prometheus
	@echo "Starting everything (Ctrl-C stops it all)..."
	exec bin/start-all

lint: $(STAMP)
	$(BIN)/ruff check .

firmware-test:
	@bin/ensure-system-deps --test
	bash firmware/host-test.sh

# The suite: ruff, the firmware's host tests (ctest), then pytest. Services come from
# DATABASE_URL / REDIS_URL / MQTT_URL or are started privately by the tests.
test: $(STAMP) .env
	@bin/ensure-system-deps --test
	$(BIN)/ruff check .
	bash firmware/host-test.sh
	$(BIN)/python -m pytest

bench: bench-ingest bench-payment

bench-ingest: $(STAMP)
	$(BIN)/python -m bench.ingest

bench-payment: $(STAMP)
	$(BIN)/python -m bench.payment

# The deterministic money simulation over many seeds (`make test` runs a few): prints how many
# steps and faults it covered, or the command that replays the first failing seed.
SEEDS ?= 200
STEPS ?= 250
soak: $(STAMP)
	$(BIN)/python -m devtools.money_sim --seeds $(SEEDS) --steps $(STEPS)

clean:
	rm -rf var staticfiles firmware/build .pytest_cache .ruff_cache
