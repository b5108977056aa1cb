# Two commands set up a fresh machine and run things:
#   make run    # dvc repro: download -> preprocess -> train -> evaluate on params.yaml
#   make test   # the test suite (what CI runs)
# Both create the virtual environment (.venv) and install what the project needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system-deps run test test-fast lint fashion-mnist clean-venv

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

# The whole pipeline on the real Fashion-MNIST (Debian's package) on a CPU, as a DVC experiment: params.yaml
# stays the CelebA default; these settings are applied on top (the README lists the figures this produced).
FASHION_MNIST := -S data.dataset=fashion_mnist -S model.architecture=mlp -S 'model.hidden_dims=[512,256]' \
	-S model.latent_dim=32 -S model.likelihood=discretized_logistic -S beta_schedule.warmup_steps=2000 \
	-S train.epochs=10 -S train.batch_size=128 -S train.lr_warmup_steps=100 -S train.cpus_per_worker=2 \
	-S train.run_name=vae-fashion-mnist -S evaluate.num_importance_samples=250 -S evaluate.importance_batch_size=125 \
	-S mlflow.experiment_name=vae-fashion-mnist -S mlflow.registered_model_name=vae-fashion-mnist
fashion-mnist: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc exp run $(FASHION_MNIST)

test-fast: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -m "not slow"

# Style and the architecture's import contracts (pyproject.toml [tool.importlinter]).
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

clean-venv:
	rm -rf $(VENV)
