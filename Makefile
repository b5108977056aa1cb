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
DEBS := dataset-fashion-mnist chromium
system-deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

setup: $(STAMP) system-deps

# The stages call `python`: the venv goes first on PATH.
run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean-venv:
	rm -rf $(VENV)
