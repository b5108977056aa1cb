"""The files stages hand to each other: the trained model (models/vae/: safetensors weights, its config, the
params, the MLflow run), the training reports, and the sweep's best values; written atomically, read with an
error that names the stage to run."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.common import StageError, atomic_output, atomic_write_text, resolve
from pipeline.config import Params, SearchedValues

MODEL_DIR = Path("models/vae")  # relative to the project root, as every path below
TRAIN_METRICS_PATH = Path("reports/train_metrics.json")
TRAIN_CURVES_PATH = Path("reports/train_curves.csv")
BEST_PARAMS_PATH = Path("reports/tune/best_params.yaml")
TRIALS_PATH = Path("reports/tune/trials.csv")


def write_training_outputs(state: dict[str, Any], name: str, run_id: str | None) -> dict[str, Any]:
    """From a run's final checkpoint state: models/vae/ (model.safetensors, model_config.json, params.json,
    run.json), reports/train_metrics.json (the last epoch's metrics) and reports/train_curves.csv (one row per
    epoch). Returns the metrics written."""
    from safetensors.torch import save_file

    model_dir = resolve(MODEL_DIR)
    with atomic_output(model_dir / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in state["model"].items()}, str(tmp))
    atomic_write_text(model_dir / "model_config.json", json.dumps(state["model_config"], indent=2) + "\n")
    atomic_write_text(model_dir / "params.json", json.dumps(state["params"], indent=2) + "\n")
    atomic_write_text(
        model_dir / "run.json", json.dumps({"run_name": name, "mlflow_run_id": run_id}, indent=2) + "\n"
    )
    history = state["history"]
    metrics = {
        **(history[-1] if history else {}),
        "run_name": name,
        "mlflow_run_id": run_id,
        "epochs": state["epoch"],
        "steps": state["step"],
    }
    atomic_write_text(TRAIN_METRICS_PATH, json.dumps(metrics, indent=2) + "\n")
    buffer = io.StringIO()
    if history:
        writer = csv.DictWriter(buffer, fieldnames=list(history[0]), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    atomic_write_text(TRAIN_CURVES_PATH, buffer.getvalue())
    return metrics


def load_trained_model(model_dir: Path | str = MODEL_DIR):
    """The VAE the train stage wrote (eval mode, on the CPU).

    Raises:
        StageError: no model there (the message names the stage to run).
    """
    from safetensors.torch import load_file

    from vae.model import VAE

    model_dir = resolve(model_dir)
    if not (model_dir / "model.safetensors").is_file():
        raise StageError(f"{model_dir}/model.safetensors is missing: run the train stage (`dvc repro train`)")
    model = VAE.from_config(json.loads((model_dir / "model_config.json").read_text()))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.eval()


def trained_run_id(model_dir: Path | str = MODEL_DIR) -> str | None:
    """The MLflow run the trained model came from (models/vae/run.json), or None."""
    path = resolve(model_dir) / "run.json"
    return json.loads(path.read_text()).get("mlflow_run_id") if path.is_file() else None


def write_best_params(summary: dict[str, Any], best: SearchedValues) -> None:
    """reports/tune/best_params.yaml: the sweep's summary (``summary``: sweep, trial, metric, value, ...) and,
    under
    ``params``, the best trial's searched values."""
    document = {**summary, "params": best.model_dump(mode="json")}
    atomic_write_text(
        BEST_PARAMS_PATH,
        "# Written by `python -m pipeline.tune`; read by the train stage when "
        "train.use_best_params is true.\n" + yaml.safe_dump(document, sort_keys=False),
    )


def write_no_sweep(reason: str) -> None:
    """best_params.yaml marked ``skipped`` (the DVC tune stage when training does not use a sweep)."""
    atomic_write_text(
        BEST_PARAMS_PATH,
        "# Written by `python -m pipeline.tune --only-if-used`: no sweep was run.\n"
        + yaml.safe_dump({"skipped": True, "reason": reason, "params": None}, sort_keys=False),
    )


def with_best_params(params: Params) -> Params:
    """``train.use_best_params``: ``params`` with the sweep's best values from reports/tune/best_params.yaml.

    Raises:
        StageError: no sweep result there, or the file does not hold valid values.
    """
    if not params.train.use_best_params:
        return params
    path = resolve(BEST_PARAMS_PATH)
    if not path.is_file():
        raise StageError(
            f"train.use_best_params is true but {path} does not exist: run the tune stage first "
            "(`dvc repro tune`) or set train.use_best_params: false"
        )
    document = yaml.safe_load(path.read_text()) or {}
    if document.get("skipped"):
        raise StageError(
            f"train.use_best_params is true but {path} holds no sweep result ({document.get('reason')}): "
            "run the sweep (`dvc repro tune`, or `python -m pipeline.tune`) first"
        )
    from pydantic import ValidationError

    try:
        best = SearchedValues.model_validate(document.get("params"))
    except ValidationError as error:
        raise StageError(
            f"{path}: not a sweep result this version reads ({error.error_count()} problem(s), first: "
            f"{error.errors()[0]['msg']}); run the sweep again"
        ) from None
    return best.apply(params)
