# agentd: the two commands a newcomer needs are `make run` and `make test`.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=

.PHONY: run test lint bench bench-test proto models train-lm system-test-deps clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Re-install when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@ $(VENV)/.installed

## run: create .venv, install, serve the built-in agents on 127.0.0.1:8080
run: $(VENV)/.installed
	$(BIN)/agentd serve $(ARGS)

## test: install test needs (Python and system packages), lint, type-check, run the whole suite
## (tests/bench included: a --quick run of each benchmark suite)
test: $(VENV)/.installed-dev system-test-deps
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	@# Tests and the servers they start find the tool components in the cache (built once).
	$(BIN)/agentd tools build --plugins tests/plugins
	$(BIN)/agentd tools build --plugins tests/tools/plugins
	$(BIN)/agentd tools build --plugins tests/security/plugins
	$(BIN)/python -m pytest -q -p no:cacheprovider

## bench: run the benchmark suites (package agentd_bench, the bench extra); JSON results go to
## benchmarks/results/
bench: $(VENV)/.installed-dev system-test-deps
	$(BIN)/agentd bench gateway
	$(BIN)/agentd bench inference
	$(BIN)/agentd bench swarm
	$(BIN)/agentd bench tools
	$(BIN)/agentd bench generate
	$(BIN)/agentd bench cluster
	$(BIN)/agentd bench reload

## bench-test: only the benchmark tests (marker bench: each suite once with --quick)
bench-test: $(VENV)/.installed-dev system-test-deps
	$(BIN)/python -m pytest -q -p no:cacheprovider -m bench

## models: retrain the built-in int8 decision model (package data), make the benchmark MLP,
## and export the tiny language model (models/tinylm/hf) to ONNX and GGUF
models: $(VENV)/.installed-dev
	$(BIN)/python scripts/train_decision_model.py --fp32-out build/models/decision-fp32/model.onnx
	$(BIN)/python scripts/make_mlp_model.py --inputs 256 --hidden 1024 --layers 4 --outputs 16 -o build/models/mlp
	$(BIN)/python -m agentd.generate.onnx_export models/tinylm/hf build/models/tinylm --dense --int8 src/agentd/models/tinylm/model.onnx
	$(BIN)/python -m agentd.generate.gguf_export models/tinylm/hf build/models/tinylm/model.f32.gguf
	$(BIN)/python -m agentd.generate.gguf_export models/tinylm/hf build/models/tinylm/model.f16.gguf --dtype f16

## train-lm: retrain the tiny language model from scratch (~7 min on 2 cores) into models/tinylm/hf
train-lm: $(VENV)/.installed-dev
	$(BIN)/python scripts/train_tiny_lm.py

## proto: regenerate Python, gRPC and Connect code from proto/
proto: $(VENV)/.installed-dev
	$(BIN)/python -m grpc_tools.protoc -Iproto \
	  --python_out=src --pyi_out=src --grpc_python_out=src \
	  --plugin=protoc-gen-connect-python=$(BIN)/protoc-gen-connect-python \
	  --connect-python_out=src \
	  $$(find proto -name '*.proto')

# System tools the tests and benchmarks drive: curl (a real HTTP client), h2load, the
# etcd and Redis servers the cluster tests start on free ports (never as system services),
# and Prometheus (prometheus and promtool) for the metrics tests.
system-test-deps:
	@missing=""; \
	command -v curl >/dev/null 2>&1 || missing="$$missing curl"; \
	command -v h2load >/dev/null 2>&1 || missing="$$missing nghttp2-client"; \
	command -v etcd >/dev/null 2>&1 || missing="$$missing etcd-server"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
