"""The files stages hand to each other: the trained model (models/vae/: safetensors weights, its config, the
params, the MLflow run), the training reports, and the sweep's best values; written atomically, read with an
error that names the stage to run."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import yaml

from pipeline import storage
from pipeline.common import StageError, atomic_output, atomic_write_text, project_root, resolve
from pipeline.config import RUN_IDENTITY_EXCLUDES, Params, SearchedValues
from pipeline.data import location_hashes

MODEL_DIR = Path("models/vae")  # relative to the project root, as every path below
TRAIN_METRICS_PATH = Path("reports/train_metrics.json")
TRAIN_CURVES_PATH = Path("reports/train_curves.csv")
BEST_PARAMS_PATH = Path("reports/tune/best_params.yaml")
TRIALS_PATH = Path("reports/tune/trials.csv")


OUTPUTS = "outputs"  # in a run's storage folder: a copy of every file the train and evaluate stages wrote


# Where the data live, not what they are: left out of run and sweep names when the arrays' hashes are known,
# so the same data read from the workspace, a node's cache or a bucket name the same run.
DATA_LOCATION_FIELDS = frozenset({"processed_dir", "raw_dir"})


def _shaping(params: Params, sections: set[str], hashes: dict[str, str]) -> dict:
    shaping = params.model_dump(mode="json", include=sections)
    if hashes:
        for field in DATA_LOCATION_FIELDS:
            shaping["data"].pop(field)
    return shaping


def run_name(params: Params, hashes: dict[str, str]) -> str:
    """``train.run_name``-<8 hex>: the hash covers the data (their hashes and settings; their location only
    when they have no manifest), the model, the beta schedule and every train setting that changes the weights
    (all but ``config.RUN_IDENTITY_EXCLUDES``), so a re-run after a crash resumes the run, on other resources
    or with the data elsewhere too, and a changed setting starts a new one."""
    shaping = _shaping(params, {"data", "model", "beta_schedule"}, hashes)
    train = params.train.model_dump(mode="json", exclude=set(RUN_IDENTITY_EXCLUDES))
    digest = hashlib.sha256(json.dumps([shaping, train, hashes], sort_keys=True).encode()).hexdigest()[:8]
    return f"{params.train.run_name}-{digest}"


def sweep_name(params: Params, hashes: dict[str, str]) -> str:
    """``tune.experiment_name``-<8 hex>: the hash covers what shapes the sweep's results (search space, ASHA
    and TPE settings, data - by their hashes when known, as in :func:`run_name` -, model, optimisation), not
    resources, so a changed sweep never resumes an unrelated one."""
    tune = params.tune.model_dump(
        mode="json",
        include={
            "num_samples",
            "metric",
            "grace_period",
            "reduction_factor",
            "seed",
            "epochs",
            "search_space",
        },
    )
    shaping = _shaping(params, {"data", "model"}, hashes)
    shaping["model"].pop("latent_dim")
    train = params.train.model_dump(
        mode="json", exclude=set(RUN_IDENTITY_EXCLUDES) | {"epochs", "learning_rate"}
    )
    digest = hashlib.sha256(json.dumps([tune, shaping, train, hashes], sort_keys=True).encode()).hexdigest()[
        :8
    ]
    return f"{params.tune.experiment_name}-{digest}"


def storage_location(params: Params) -> str:
    """``train.storage_path`` as an absolute path (relative = project root) or a URI, unchanged."""
    return storage.storage_location(params.train.storage_path)


def run_location(params: Params, name: str | None = None) -> str:
    """The run's folder in ``train.storage_path`` (checkpoints, the MLflow run id, ``outputs/``). Without
    ``name``, the run these params train (its name needs only the data's manifest, not the arrays)."""
    if name is None:
        hashes = location_hashes(params.data.processed_location(), params.cluster.s3_endpoint_url)
        name = run_name(with_best_params(params), hashes)
    return storage.join(storage_location(params), name)


def sweep_location(params: Params, name: str | None = None) -> str:
    """The sweep's folder in ``<train.storage_path>/tune/`` (Tune's state, the trials, ``outputs/``): that of
    sweep ``name``, else of the sweep these params run (its name needs only the data's manifest)."""
    if name is None:
        hashes = location_hashes(params.data.processed_location(), params.cluster.s3_endpoint_url)
        name = sweep_name(params, hashes)
    return storage.join(storage_location(params), "tune", name)


def save_sweep_outputs(params: Params, name: str) -> str:
    """Copy reports/tune/ (best_params.yaml, trials.csv) into the sweep's storage folder,
    ``<train.storage_path>/tune/<sweep>/outputs/``, where a later stage or ``pipeline.jobs fetch`` finds them
    by the sweep's identity, wherever the sweep ran. Returns that folder."""
    target = storage.join(sweep_location(params, name), OUTPUTS)
    endpoint = params.cluster.s3_endpoint_url
    storage.upload_tree(project_root(), [BEST_PARAMS_PATH, TRIALS_PATH], target, endpoint)
    return target


def save_stage_outputs(params: Params, name: str, relative: list[Path]) -> str:
    """Copy stage outputs (paths relative to the project root, files or folders) into the run's storage
    folder, ``<train.storage_path>/<run name>/outputs/``, where the next stage finds them however the stage
    ran (a submitted job's working folder is Ray's temporary copy). Returns that folder."""
    target = storage.join(run_location(params, name), OUTPUTS)
    storage.upload_tree(project_root(), [Path(p) for p in relative], target, params.cluster.s3_endpoint_url)
    return target


def fetch_stage_outputs(params: Params, root: Path | None = None) -> tuple[list[str], list[str]]:
    """Copy the outputs these params' stages left in storage into ``root`` (default: the project root), the
    same relative paths: the sweep's (reports/tune/) when ``train.use_best_params`` is set and it ran, then
    the run's (models/vae/, reports/...) when it was trained. Returns (where from, files copied).

    Raises:
        StageError: neither has outputs there yet (the message says which stage to run).
    """
    endpoint, root = params.cluster.s3_endpoint_url, root or project_root()
    sources, files = [], []
    if params.train.use_best_params:
        sweep = storage.join(sweep_location(params), OUTPUTS)
        found = storage.download_tree(sweep, root, endpoint)
        sources += [sweep] if found else []
        files += found
        if not found:
            raise StageError(f"no sweep outputs in {sweep}: run the sweep for these params first (`dvc "
                             "repro tune`, or a `python -m pipeline.tune` job), or set "
                             "train.use_best_params: false")
    source = storage.join(run_location(params), OUTPUTS)
    found = storage.download_tree(source, root, endpoint)
    if not found and not files:
        raise StageError(f"no stage outputs in {source}: train these params first (the run name follows "
                         "from the data and every setting that changes the weights)")
    return sources + ([source] if found else []), files + found


def model_dir_for(params: Params) -> Path:
    """Where the evaluate stage reads the model these params train: models/vae/ when it holds that run (the
    DVC pipeline); else the run's own copy in its storage (a submitted train job, whose workspace was Ray's),
    fetched into this node's cache; else models/vae/ as it is.

    Raises:
        StageError: neither place has a model (the message names both).
    """
    local = resolve(MODEL_DIR)
    try:
        location = run_location(params)
    except (OSError, FileNotFoundError, ValueError):  # no data manifest yet: only the local model can serve
        location = None
    name = location.rstrip("/").rsplit("/", 1)[-1] if location else None
    if model_run_name(local) == name and name is not None:
        return local
    if location is not None:
        remote = storage.join(location, OUTPUTS, MODEL_DIR.as_posix())
        cache = storage.cache_root() / "runs" / name / MODEL_DIR
        if storage.download_tree(remote, cache, params.cluster.s3_endpoint_url):
            return cache
    if (local / "model.safetensors").is_file():
        return local
    raise StageError(
        f"{local}/model.safetensors is missing and the run's storage has no model ("
        f"{storage.join(location, OUTPUTS) if location else 'no run: the data manifest is missing'}): run "
        "the train stage with these params first (`dvc repro train`, or on a cluster `ray job submit ... -- "
        "python -m pipeline.train`)"
    )


def model_run_name(model_dir: Path) -> str | None:
    """The training run a model folder came from (its run.json), or None (no model, or no run.json)."""
    path = model_dir / "run.json"
    if not (model_dir / "model.safetensors").is_file() or not path.is_file():
        return None
    return json.loads(path.read_text()).get("run_name")


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


def best_params_document(params: Params) -> tuple[str, dict[str, Any]]:
    """The sweep result ``train.use_best_params`` reads, and where it came from: the copy in the storage of
    the sweep these params run (by its identity: whoever ran it, wherever), else reports/tune/best_params.yaml
    in the workspace - never in a submitted job (``VAE_SUBMITTED``), whose workspace is Ray's copy of the
    submitter's tree and may hold another sweep's file.

    Raises:
        StageError: neither holds one (the message names both).
    """
    stored = storage.join(sweep_location(params), OUTPUTS, BEST_PARAMS_PATH.as_posix())
    try:
        return stored, yaml.safe_load(storage.read_bytes(stored, params.cluster.s3_endpoint_url)) or {}
    except FileNotFoundError:
        pass
    path = resolve(BEST_PARAMS_PATH)
    if path.is_file() and not os.environ.get("VAE_SUBMITTED"):
        return str(path), yaml.safe_load(path.read_text()) or {}
    raise StageError(
        f"train.use_best_params is true but the sweep these params run left no result in {stored}"
        + ("" if os.environ.get("VAE_SUBMITTED") else f" and {path} does not exist")
        + ": run the tune stage first (`dvc repro tune`, or a `python -m pipeline.tune` job with the same "
        "params) or set train.use_best_params: false"
    )


def with_best_params(params: Params) -> Params:
    """``train.use_best_params``: ``params`` with the sweep's best values (:func:`best_params_document`).

    Raises:
        StageError: no sweep result, or one that does not hold valid values.
    """
    if not params.train.use_best_params:
        return params
    path, document = best_params_document(params)
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
