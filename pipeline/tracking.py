"""MLflow for the stages: the tracking URI, runs opened and closed on the driver, the compared params, the
final model and the best-NLL alias. The workers' logger is :mod:`pipeline.run_logger`; sweeps' parent and
trial runs are in ``pipeline.tune.tracking``."""

from __future__ import annotations

import dataclasses
import logging
import os
import subprocess
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.common import REPO_ROOT, StageError, resolve
from pipeline.config import Params

RUN_ID_FILE = "mlflow_run_id"  # in a run's checkpoint folder: the MLflow run a resumed run logs to again

log = logging.getLogger(__name__)


# Runs are compared by a few parameters, logged as MLflow params under short names (the runs table's columns,
# the caption MLflow's UI prints above every picture): see compared_params. The whole configuration goes to
# every run as one artifact, CONFIG_ARTIFACT.
CONFIG_ARTIFACT = "config/params.json"
# MLflow 3's UI opens an experiment without a kind on its GenAI overview (traces, no charts); this kind opens
# it on the runs table and the model-training views. The UI's global GenAI / Model training switch can still
# override it, so links to the UI also carry UI_QUERY.
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
UI_QUERY = "?workflowType=machine_learning"
# The registered model version with the lowest test NLL (bits/dim) of its name, moved by the evaluate stage.
BEST_ALIAS = "best-test-nll"


def schedule_params(schedule) -> dict[str, Any]:
    """A beta schedule (a :mod:`vae.schedules` dataclass) as flat params: ``beta_schedule`` (its name) and
    its fields as ``schedule.<field>``; the names sweeps' trial runs use too, so runs compare across
    experiments."""
    fields = {
        key: value
        for key, value in dataclasses.asdict(schedule).items()
        if key != "name" and value is not None
    }
    return {"beta_schedule": schedule.name, **{f"schedule.{key}": value for key, value in fields.items()}}


def compared_params(params: Params) -> dict[str, Any]:
    """What runs are compared by, under short names: dataset (plus image_size for CelebA), architecture,
    likelihood, latent_dim, the beta schedule (:func:`schedule_params`), learning_rate, batch_size, epochs."""
    chosen: dict[str, Any] = {"dataset": params.data.dataset}
    if params.data.dataset == "celeba":
        chosen["image_size"] = params.data.image_size
    chosen.update({
        "architecture": params.model.architecture,
        "likelihood": params.model.likelihood,
        "latent_dim": params.model.latent_dim,
        **schedule_params(params.beta_schedule),
        "learning_rate": params.train.learning_rate,
        "batch_size": params.train.batch_size,
        "epochs": params.train.epochs,
    })
    return chosen


def log_params_and_config(client, run_id: str, values: dict[str, Any], params: Params) -> None:
    """Log ``values`` (what the run is compared by: :func:`compared_params`, a trial's searched values) as
    MLflow params and the whole configuration ``params`` as the run's :data:`CONFIG_ARTIFACT` (JSON, as
    models/vae/params.json holds it)."""
    from mlflow.entities import Param

    items = [Param(key, str(value)[:6000]) for key, value in values.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100], synchronous=True)
    client.log_dict(run_id, params.model_dump(mode="json"), CONFIG_ARTIFACT)


def ensure_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment ``name``, created (with :data:`EXPERIMENT_KIND_TAG`) when missing; an existing
    experiment without that kind gets it. Safe when another process creates it at the same time."""
    key, kind = EXPERIMENT_KIND_TAG
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location, tags={key: kind})
        except Exception:  # noqa: BLE001 - created meanwhile by another process
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.tags.get(key) != kind:
        client.set_experiment_tag(experiment.experiment_id, key, kind)
    return experiment.experiment_id


def ui_url(base: str, experiment_id: str, run_id: str | None = None, tab: str = "", **query: str) -> str:
    """The MLflow UI address of an experiment (its runs table) or of one run (``tab``: "", "model-metrics",
    "artifacts"), in the model-training views; ``query`` adds URL parameters (compareRunsMode="CHART")."""
    path = f"/runs/{run_id}" + (f"/{tab}" if tab else "") if run_id else "/runs"
    extra = "".join(f"&{key}={value}" for key, value in query.items())
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}{path}{UI_QUERY}{extra}"


def promote_if_best(client, model_name: str, run_id: str, figures: dict[str, Any]) -> str | None:
    """Tag the newest registered version of ``model_name`` logged by ``run_id`` with its test figures
    (``test_nll_bits_per_dim``, ``test_nll`` in nats/image, K and the number of test images) and move the
    :data:`BEST_ALIAS` alias to it when its test NLL in bits/dim is lower than the current holder's (or
    nothing holds the alias yet). Returns the version (a string) that holds the alias afterwards, or None
    when the run registered no version. Raises KeyError when ``figures`` has no ``test_nll_bits_per_dim``."""
    from mlflow.exceptions import MlflowException

    versions = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    if not versions:
        return None
    version = str(max(int(v.version) for v in versions))  # the client gives int or str by call
    bits = float(figures["test_nll_bits_per_dim"])
    for key in ("test_nll_bits_per_dim", "test_nll", "num_importance_samples", "num_test_images"):
        if key in figures:
            client.set_model_version_tag(model_name, version, key, str(figures[key]))
    try:
        holder = client.get_model_version_by_alias(model_name, BEST_ALIAS)
    except MlflowException:
        holder = None
    if holder is not None and str(holder.version) != version:
        try:
            if float(holder.tags["test_nll_bits_per_dim"]) <= bits:
                return str(holder.version)
        except (KeyError, ValueError):
            pass  # a holder with no figure loses the alias to one with a figure
    client.set_registered_model_alias(model_name, BEST_ALIAS, version)
    return version


def tracking_uri(configured: str | None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else params' ``mlflow.tracking_uri``, else ``sqlite:///<project>/mlflow.db``
    (an absolute path: Ray changes the working directory of its workers).

    Raises:
        StageError: a file store (``file:`` or a bare path). Every record reaches MLflow exactly once only
            because a record sent again (a retry, a resumed run re-sending its checkpoint's records) is the
            same row, which MLflow's SQL stores - SQLite, PostgreSQL, MySQL, and a tracking server on one of
            them - keep once; a file store appends it again, silently.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or configured
    if not uri:
        return f"sqlite:///{resolve('mlflow.db')}"
    if urllib.parse.urlparse(uri).scheme in ("", "file"):
        raise StageError(
            f"MLflow tracking URI {uri!r} is a file store, which logs a record sent twice (a retry, a "
            "resumed run) twice; use a SQL store (sqlite:///path/mlflow.db) or a tracking server "
            "(http://host:port), in mlflow.tracking_uri or MLFLOW_TRACKING_URI"
        )
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{resolve(uri.removeprefix('sqlite:///'))}"
    return uri


def image_grid(images: np.ndarray, rows: int | None = None) -> np.ndarray:
    """Tile float images (N, C, H, W) in [0, 1] into one uint8 (rows*H, cols*W, C) picture (C = 1
    squeezed)."""
    images = np.clip(np.asarray(images, dtype=np.float32), 0.0, 1.0)
    n, c, h, w = images.shape
    cols = int(np.ceil(n / rows)) if rows else int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for index in range(n):
        r, col = divmod(index, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = (
            images[index].transpose(1, 2, 0) * 255 + 0.5
        ).astype(np.uint8)
    return grid[..., 0] if c == 1 else grid


# ----------------------------------------------------------------------------------------------------------
# Runs opened on the driver
# ----------------------------------------------------------------------------------------------------------
# Set by the submitting side (``python -m pipeline.lineage`` for ``ray job submit --runtime-env-json``, or
# pipeline.submit): a job runs in Ray's unpacked copy of the working tree, which has no .git folder.
GIT_COMMIT_ENV = "VAE_GIT_COMMIT"
GIT_DIRTY_ENV = "VAE_GIT_DIRTY"


def git_commit() -> str:
    """The commit the code was run from (the lineage tag of runs): ``VAE_GIT_COMMIT`` when the submitting side
    set it, else ``git rev-parse HEAD`` of the checkout, else "unknown"."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def git_dirty() -> bool | None:
    """Whether tracked files differed from the commit (``VAE_GIT_DIRTY`` when the submitting side set it);
    None when unknown."""
    if os.environ.get(GIT_DIRTY_ENV) in ("true", "false"):
        return os.environ[GIT_DIRTY_ENV] == "true"
    try:
        return bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                                   capture_output=True, text=True, timeout=10, check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        return None


def lineage_env() -> dict[str, str]:
    """What a submission passes to its job: ``{VAE_GIT_COMMIT: sha, VAE_GIT_DIRTY: "true"|"false"|"unknown"}``
    of the submitting checkout."""
    dirty = git_dirty()
    return {GIT_COMMIT_ENV: git_commit(), GIT_DIRTY_ENV: "unknown" if dirty is None else str(dirty).lower()}


def lineage_tags() -> dict[str, str]:
    """``git_commit``, ``git_dirty`` and MLflow's own source-commit tag (shown in the run's overview)."""
    commit, dirty = git_commit(), git_dirty()
    tags = {"git_commit": commit, "git_dirty": "unknown" if dirty is None else str(dirty).lower()}
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def open_training_run(
    params: Params,
    name: str,
    run_location: str,
    hashes: dict[str, str],
    tags: dict[str, str] | None = None,
) -> tuple[str, str]:
    """Start (or, when resuming, reopen) this training run's MLflow run; returns (run_id, tracking URI).

    ``run_location`` is the run's checkpoint folder (a path or an ``s3://`` URI), where the run id is kept so
    a resumed run - on another node too - logs to the same MLflow run."""
    import mlflow
    import ray
    import torch

    uri = tracking_uri(params.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment_id = ensure_experiment(client, params.mlflow.experiment_name)
    id_location = storage.join(run_location, RUN_ID_FILE)
    endpoint = params.cluster.s3_endpoint_url
    try:
        run_id = storage.read_bytes(id_location, endpoint).decode().strip()
    except FileNotFoundError:
        run_id = ""
    if run_id:
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id, uri
        except Exception:  # noqa: BLE001 - the old run is gone (another tracking store): start a new one
            pass
    run = client.create_run(
        experiment_id,
        run_name=name,
        tags={
            **lineage_tags(),
            "torch_version": torch.__version__,
            "ray_version": ray.__version__,
            "ray_train_run_name": name,
            "dataset": params.data.dataset,
            **hashes,
            **(tags or {}),
        },
    )
    log_params_and_config(client, run.info.run_id, compared_params(params), params)
    storage.write_bytes(id_location, run.info.run_id.encode(), endpoint)
    return run.info.run_id, uri


def log_final_model(params: Params, run_id: str, uri: str, model, example) -> None:
    """Log the trained model with ``mlflow.pytorch.log_model`` (input example + inferred signature: uint8
    images in, reconstructions in [0, 1] out) and register it under ``mlflow.registered_model_name``.

    The pickle format with ``code_paths=["vae"]`` keeps the whole VAE interface (``sample``, ``encode``,
    ``decode``) after ``mlflow.pytorch.load_model``; torch.export's format would keep only ``forward``."""
    import mlflow
    import mlflow.pytorch
    import torch

    model = model.cpu().eval()
    # MLflow warns on every pickle-format log_model. The pickle is chosen on purpose (see above; torch.export
    # would keep only forward), the weights are also in models/vae/model.safetensors (loaded without
    # unpickling by the evaluate stage), so the warning is kept out of the job log.
    # The run's link is printed once, when the run ends, not also when this block's start_run closes.
    quiet = logging.getLogger("mlflow.pytorch")
    level, printing = quiet.level, os.environ.get("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    quiet.setLevel(logging.ERROR)
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    try:
        _log_model(mlflow, params, run_id, model, example, torch)
    finally:
        quiet.setLevel(level)
        if printing is None:
            os.environ.pop("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", None)
        else:
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = printing


def _log_model(mlflow, params: Params, run_id: str, model, example, torch) -> None:
    with mlflow.start_run(run_id=run_id):
        with torch.no_grad():
            prediction = model(torch.from_numpy(example)).numpy()
        signature = mlflow.models.infer_signature(example, prediction)
        mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=example,
            signature=signature,
            serialization_format="pickle",
            code_paths=[str(REPO_ROOT / "vae")],
            registered_model_name=params.mlflow.registered_model_name,
        )


def end_run(uri: str, run_id: str, status: str) -> None:
    """Close a run: FINISHED, FAILED or KILLED."""
    from mlflow import MlflowClient

    MlflowClient(uri).set_terminated(run_id, status=status)


def log_artifact(uri: str, run_id: str, path: Path) -> None:
    from mlflow import MlflowClient

    MlflowClient(uri).log_artifact(run_id, str(path))
