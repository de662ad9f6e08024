# `make run` brings everything up on localhost:4000; `make test` runs every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= examples/config.yaml

.PHONY: install redis-server kubectl promtool test run protos envoy-config deploy-envoy-config bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

redis-server:
	@scripts/ensure-redis-server

kubectl:
	@scripts/ensure-kubectl

promtool:
	@scripts/ensure-promtool

test: install redis-server kubectl promtool
	$(PY) -m pytest

run: install
	@scripts/run

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
