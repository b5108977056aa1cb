# Two commands set up a fresh machine and run things:
#   make run    # dvc repro: download -> preprocess -> train -> evaluate on params.yaml
#   make test   # the test suite (what CI runs)
# Both create the virtual environment (.venv) and install what the project needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps run test lint fashion-mnist clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages: the real Fashion-MNIST (offline data for real runs and tests) and Chromium (screenshots of
# the MLflow UI). Installed only when missing; needs root or sudo.
system-deps:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] && [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

setup: $(STAMP) system-deps

run: setup
	$(VENV)/bin/dvc repro

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
