# Two commands set up a fresh machine and run things:
#   make run    # the quick start: the whole pipeline on Fashion-MNIST (offline, ~10 min on 2 cores)
#   make test   # the test suite (what CI runs)
# Both create the virtual environment (.venv) and install what the project needs first.
SHELL := /bin/bash
# The system's Python when there is one: with `local-cluster up --hosts` the cluster's processes run this
# venv's interpreter as unprivileged accounts, which cannot reach one installed under /root (pyenv).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps run celeba compare test test-fast lint fashion-mnist clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Debian packages: the real Fashion-MNIST (offline data for real runs and tests), Chromium and its driver
# (screenshots and the browser test of the MLflow UI). Installed only when missing; needs root or sudo.
DEBS := dataset-fashion-mnist chromium chromium-driver
system-deps:
	@missing=""; for p in $(DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  echo "installing Debian packages:$$missing"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

setup: $(STAMP) system-deps

# The quick start: download -> preprocess -> tune -> train -> evaluate on Debian's Fashion-MNIST as a DVC
# experiment (settings in pipeline/quickstart.py); params.yaml and dvc.lock are left as they were.
run: setup
	$(PY) -m pipeline.quickstart
fashion-mnist: run

# The reference job: `dvc repro` on params.yaml (CelebA 64x64, GPU-scale). The stages call `python`: the venv
# goes first on PATH.
celeba: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

# The model table: architectures x likelihoods on Fashion-MNIST at one budget (pipeline/compare.py), each a DVC
# experiment; writes reports/model_table.md. About an hour on 2 cores.
compare: setup
	$(PY) -m pipeline.compare

test: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q

test-fast: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -m "not slow"

# Style and the architecture's import contracts (pyproject.toml [tool.importlinter]).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean-venv:
	rm -rf $(VENV)
