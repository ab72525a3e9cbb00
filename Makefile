# sensor-gateway: the commands README.md documents.
#   make run          the whole pipeline locally (broker, databases, three daemons), data in ./var
#                     (RUN_DATA=; ports MQTT_PORT=, REDIS_PORT=, MONGODB_PORT=, API_PORT=)
#   make test         the default test suite (real services on loopback)
#   make test-systemd the units inside a real systemd (systemd-nspawn container)
#   make e2e          Ansible deployment into a fresh container, end to end
#   make bench        the benchmarks (one JSON line each)
#   make screenshot   docs/dashboard.png and docs/sensor.png (Playwright + Debian's chromium)
#   make soak         the chaos soak, ~10 minutes (SOAK_SECONDS=, SOAK_SEED=), one JSON line
#   make fuzz         atheris fuzzing of the payload contract and the batch path,
#                     FUZZ_SECONDS (default 600) in all, one JSON line
#   make lint         ruff and ansible-lint
PY := .venv/bin/python

.PHONY: deps deps-systemd deps-deploy run test test-systemd e2e bench screenshot soak fuzz lint clean

deps:
	.ci/install-deps.sh base

deps-systemd:
	.ci/install-deps.sh base systemd

deps-deploy:
	.ci/install-deps.sh base deploy

# devstack/ is the repository's tooling, never installed: python -m from here.
RUN_DATA ?= var
run: deps
	$(PY) -m devstack.run --data $(RUN_DATA)

test: deps
	$(PY) -m pytest

test-systemd: deps-systemd
	tests/systemd/run.sh

e2e: deps-deploy
	tests/e2e/run.sh

bench: deps
	$(PY) bench/ingest.py
	$(PY) bench/api.py
	$(PY) bench/export.py

screenshot: deps
	$(PY) docs/screenshot.py

SOAK_SECONDS ?= 600
SOAK_SEED ?=
soak: deps
	$(PY) -m tests.soak.chaos --duration $(SOAK_SECONDS) $(if $(SOAK_SEED),--seed $(SOAK_SEED))

FUZZ_SECONDS ?= 600
fuzz: deps
	$(PY) tests/fuzz/run.py --seconds $(FUZZ_SECONDS)

lint: deps-deploy
	.venv/bin/ruff check sensor_gateway devstack tests bench config docs
	.venv/bin/ruff format --check sensor_gateway devstack tests bench config docs
	cd deploy/ansible && ../../.venv/bin/ansible-lint --profile production site.yml

clean:
	rm -rf var .pytest_cache
