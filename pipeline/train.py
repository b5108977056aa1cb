"""Train stage: a Ray Train ``TorchTrainer`` over :func:`pipeline.train_loop.train_worker`, tracked in MLflow.

    python -m pipeline.train [--params params.yaml]            # dvc repro train calls this
    ray job submit --working-dir . -- python -m pipeline.train  # the same on a running cluster

Ray: ``cluster.address`` or ``RAY_ADDRESS`` selects a running cluster; otherwise a local one is started.
Checkpoints go to ``train.storage_path``/<run name> every epoch. The run name is ``train.run_name`` plus a
hash of everything that shapes the weights (data, model, beta schedule, optimisation), so re-running the
stage after a crash resumes the same run from its latest checkpoint, while a changed config starts a new one
instead of resuming an unrelated run by accident.

Outputs (DVC): models/vae/ (model.safetensors + model_config.json + params.json), reports/train_metrics.json,
reports/train_curves.csv.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from pipeline.checkpoints import read_persisted_state, save_state
from pipeline.common import MODEL_DIR, StageError, atomic_write_text, run_stage, stage_argument_parser  # noqa: F401 (re-exported)
from pipeline.config import REPO_ROOT, RUN_IDENTITY_EXCLUDES, Params, flatten, load_params, resolve
from pipeline.train_loop import NonFiniteLossError, WorkerConfig, train_worker

METRICS_PATH = Path("reports/train_metrics.json")
CURVES_PATH = Path("reports/train_curves.csv")
BEST_PARAMS_PATH = Path("reports/tune/best_params.yaml")
RUN_ID_FILE = "mlflow_run_id"
# Written into the run's storage folder by rank 0 when the loss diverged: the workers then end normally, since Ray
# Train retries every worker exception (up to train.max_failures) and a divergence would only repeat.
NON_FINITE_FILE = "non_finite_loss.txt"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=resolve("."), capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def data_hashes(processed_dir: Path) -> dict[str, str]:
    """The content hashes of the preprocessed arrays from the preprocess stage's manifest."""
    manifest_path = processed_dir / "manifest.json"
    if not manifest_path.is_file():
        return {}
    manifest = json.loads(manifest_path.read_text())
    hashes = {}
    for split, info in manifest.get("splits", {}).items():
        for name, digest in (info.get("files") or {}).items():
            hashes[f"data.sha256.{name}" if name.startswith(split) else f"data.sha256.{split}.{name}"] = str(digest)
    return hashes


def with_best_params(params: Params) -> Params:
    """``train.use_best_params``: overlay reports/tune/best_params.yaml (written by the tune stage)."""
    if not params.train.use_best_params:
        return params
    import yaml

    path = resolve(BEST_PARAMS_PATH)
    if not path.is_file():
        raise StageError(f"train.use_best_params is true but {path} does not exist: run the tune stage first "
                         "(`dvc repro tune`) or set train.use_best_params: false")
    raw = params.model_dump(mode="json")
    best = yaml.safe_load(path.read_text()) or {}
    if best.get("skipped"):
        raise StageError(f"train.use_best_params is true but {path} holds no sweep result ({best.get('reason')}): "
                         "run the sweep (`dvc repro tune`, or `python -m pipeline.tune`) first")
    for section, values in (best.get("params") or {}).items():
        if section == "beta_schedule":
            raw["beta_schedule"] = values
        else:
            raw.setdefault(section, {}).update(values)
    from pipeline.config import parse_params

    return parse_params(raw, f"params.yaml + {path}")


def run_name(params: Params, hashes: dict[str, str]) -> str:
    """``train.run_name``-<8 hex>: the hash covers the data (their hashes and settings), the model, the beta
    schedule and every train setting that changes the weights (all but ``config.RUN_IDENTITY_EXCLUDES``), so a
    re-run after a crash resumes the run, on other resources too, and a changed setting starts a new one."""
    shaping = params.model_dump(mode="json", include={"data", "model", "beta_schedule"})
    train = params.train.model_dump(mode="json", exclude=set(RUN_IDENTITY_EXCLUDES))
    digest = hashlib.sha256(json.dumps([shaping, train, hashes], sort_keys=True).encode()).hexdigest()[:8]
    return f"{params.train.run_name}-{digest}"


# ----------------------------------------------------------------------------------------------------------
# Ray Train adapter
# ----------------------------------------------------------------------------------------------------------
CHECKPOINT_DIR_PATTERN = re.compile(r"^checkpoint_epoch_(\d+)$")


def checkpoint_epoch(path: str | None) -> int:
    """The epoch in a ``checkpoint_epoch_NNNN`` folder name (0 for None or another name)."""
    found = CHECKPOINT_DIR_PATTERN.match(Path(path).name) if path else None
    return int(found.group(1)) if found else 0


def newest_persisted_checkpoint(filesystem, run_path: str, newer_than: int = 0) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint in a run's storage folder that is newer than epoch ``newer_than``.

    Why: Ray Train (V2) writes a checkpoint to storage inside ``ray.train.report`` but registers it only when
    the controller next polls the workers (every ~2 s). A worker, node or driver killed in between leaves a
    checkpoint on storage that ``ray.train.get_checkpoint()`` does not know, and the run would repeat that
    epoch or, killed early in epoch 2, restart from scratch. The folders are scanned newest first; one whose
    ``state.pt`` cannot be read (an upload cut short) or whose recorded epoch differs from its name is skipped.

    Args:
        filesystem: the ``pyarrow.fs.FileSystem`` of the run's storage (local, S3, GCS, ...).
        run_path: the run's folder on that filesystem (``<storage_path>/<run name>``).
        newer_than: only checkpoints of a later epoch count (the one Ray registered, or 0).

    Returns:
        ``(folder path, state dict)`` or None when no newer complete checkpoint exists.
    """
    import pyarrow.fs as pafs

    try:
        entries = filesystem.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    except OSError:
        return None
    folders = sorted(((checkpoint_epoch(entry.path), entry.path) for entry in entries
                      if entry.type == pafs.FileType.Directory and checkpoint_epoch(entry.path) > newer_than), reverse=True)
    for epoch, path in folders:
        try:
            state = read_persisted_state(filesystem, path)
        except Exception:  # noqa: BLE001 - an incomplete or unreadable checkpoint: try the previous one
            continue
        if int(state.get("epoch", -1)) == epoch:
            return path, state
    return None


class RaySession:
    """:class:`pipeline.train_loop.Session` on top of ``ray.train`` (inside a TorchTrainer worker)."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()

    def load_checkpoint(self):
        """The state to resume from: Ray's registered checkpoint, or a newer one already on storage (see
        :func:`newest_persisted_checkpoint`). Rank 0 chooses and the other ranks load its choice, so every rank
        resumes from the same epoch."""
        import ray.train

        registered = ray.train.get_checkpoint()
        storage = ray.train.get_context().get_storage()
        chosen: str | None = registered.path if registered is not None else None
        state = None
        if self.world_rank == 0:
            newer = newest_persisted_checkpoint(storage.storage_filesystem, storage.experiment_fs_path,
                                                checkpoint_epoch(chosen))
            if newer is not None:
                chosen, state = newer
                print(f"[train] {chosen} was written but not yet registered by Ray when the run stopped; "
                      "resuming from it", flush=True)
        if self.world_size > 1:
            chosen = broadcast_from_rank0(chosen)
        if chosen is None:
            return None
        return state if state is not None else read_persisted_state(storage.storage_filesystem, chosen)

    def report(self, metrics, state, epoch):
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="vae-ckpt-") as directory:
            save_state(state, Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=f"checkpoint_epoch_{epoch:04d}")

    def should_continue(self, epoch: int) -> bool:
        return True

    def record_non_finite(self, error: NonFiniteLossError) -> None:
        """Rank 0 writes the divergence into the run's storage folder (:data:`NON_FINITE_FILE`), where the
        driver finds it."""
        if self.world_rank != 0:
            return
        import ray.train

        storage = ray.train.get_context().get_storage()
        with storage.storage_filesystem.open_output_stream(f"{storage.experiment_fs_path}/{NON_FINITE_FILE}") as out:
            out.write(str(error).encode())


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank of the initialised ``torch.distributed`` process group."""
    import torch
    import torch.distributed as dist

    box = [value]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def final_state(result) -> dict[str, Any] | None:
    """The state of a finished run: the newest complete checkpoint, whether or not Ray registered it (a restart
    after the last epoch's checkpoint was written but before it was registered trains nothing more and reports
    nothing; see :func:`newest_persisted_checkpoint`). Unregistered checkpoints older than the newest registered
    one are removed, so ``train.checkpoint_num_to_keep`` still bounds the folder."""
    registered = {checkpoint_epoch(c.path): c.path for c, _ in (result.best_checkpoints or [])}
    newest = max(registered, default=0)
    if result.checkpoint is not None:
        newest = max(newest, checkpoint_epoch(result.checkpoint.path))
    newer = newest_persisted_checkpoint(result.filesystem, result.path, newest)
    if newer is not None:
        print(f"[train] final state from {newer[0]} (written, not yet registered by Ray when the run ended)", flush=True)
        return newer[1]
    keep = set(registered.values()) | ({result.checkpoint.path} if result.checkpoint is not None else set())
    _remove_orphan_checkpoints(result.filesystem, result.path, keep, newest)
    if result.checkpoint is None:
        return None
    return read_persisted_state(result.filesystem, result.checkpoint.path)


def _remove_orphan_checkpoints(filesystem, run_path: str, keep: set[str], older_than: int) -> None:
    import pyarrow.fs as pafs

    try:
        entries = filesystem.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
        for entry in entries:
            epoch = checkpoint_epoch(entry.path)
            if entry.type == pafs.FileType.Directory and 0 < epoch < older_than and entry.path not in keep:
                filesystem.delete_dir(entry.path)
    except OSError as error:  # tidying only; the outputs do not depend on it
        print(f"[train] could not remove an unregistered old checkpoint in {run_path}: {error}", file=sys.stderr)


def ray_train_function(config: dict[str, Any], session: RaySession | None = None) -> None:
    """The function each Ray Train worker runs. A divergence (:class:`NonFiniteLossError`, raised on every rank at
    the same step) ends the workers normally after it is recorded: Ray would retry an exception from the last
    checkpoint, and the same data and weights would diverge again."""
    session = session or RaySession()
    try:
        train_worker(config["worker"], session)
    except NonFiniteLossError as error:
        session.record_non_finite(error)


def non_finite_error(filesystem, run_path: str) -> str | None:
    """The divergence message a run's workers recorded (:data:`NON_FINITE_FILE`), or None."""
    import pyarrow.fs as pafs

    path = f"{run_path}/{NON_FINITE_FILE}"
    if filesystem.get_file_info(path).type != pafs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.readall().decode()


def clear_non_finite(storage: str, name: str) -> None:
    """Remove a divergence record an earlier attempt of this run left (a re-run decides afresh)."""
    import pyarrow.fs as pafs

    filesystem, root = pafs.FileSystem.from_uri(storage)
    with contextlib.suppress(FileNotFoundError, OSError):
        filesystem.delete_file(f"{root}/{name}/{NON_FINITE_FILE}")


def connect_ray(params: Params) -> None:
    """``ray.init`` on ``cluster.address`` / ``RAY_ADDRESS`` / a new local instance, failing fast with a clear
    message when an address is given but nothing answers there."""
    import ray

    if ray.is_initialized():
        return
    address = params.cluster.address or os.environ.get("RAY_ADDRESS")
    probe_address(address)
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise StageError(f"cannot connect to the Ray cluster at {address!r}: {error}. Start it "
                         "(`ray start --head`, or infra/local-cluster.sh up) or unset cluster.address / RAY_ADDRESS "
                         "to train on a local Ray instance.") from None


def probe_address(address: str | None, timeout_s: float = 5.0) -> None:
    """Fail fast when a ``host:port`` Ray address does not answer: ``ray.init`` itself retries for minutes.

    Raises:
        StageError: nothing listens at the address.
    """
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as error:
        raise StageError(f"no Ray cluster answers at {address!r} ({error}). Start it (`ray start --head`, or "
                         "infra/local-cluster.sh up and `source` its env.sh) or unset cluster.address / RAY_ADDRESS "
                         "to train on a local Ray instance.") from None


def check_storage(storage: str) -> None:
    """Fail fast when a local ``train.storage_path`` cannot be written (Ray would fail only at the first
    checkpoint, after an epoch of work). Object-store URIs are left to Ray.

    Raises:
        StageError: the folder cannot be created or written.
    """
    if "://" in storage:
        return
    try:
        Path(storage).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=storage, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise StageError(f"train.storage_path {storage!r} is not writable ({error.strerror or error}); point it at "
                         "a folder you can write (on a multi-node cluster: storage all nodes share)") from None


def resolve_use_gpu(params: Params) -> bool:
    """train.use_gpu "auto" -> whether the cluster has GPUs; true with no GPU in the cluster is an error."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    wanted = params.train.use_gpu
    workers = params.train.min_workers or params.train.num_workers
    if wanted is True and cluster_gpus < params.train.gpus_per_worker * workers:
        raise StageError(f"train.use_gpu is true with {workers} worker(s) x "
                         f"{params.train.gpus_per_worker} GPU, but the Ray cluster has {cluster_gpus:g} GPU(s); "
                         "lower train.num_workers / train.gpus_per_worker or set train.use_gpu: auto")
    return bool(cluster_gpus > 0) if wanted == "auto" else bool(wanted)


def check_cpu_capacity(params: Params, use_gpu: bool) -> None:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    workers = params.train.min_workers or params.train.num_workers
    needed = workers * params.train.cpus_per_worker
    if needed > cpus and not os.environ.get("RAY_AUTOSCALER_ENABLED"):
        raise StageError(f"{workers} train worker(s) x train.cpus_per_worker "
                         f"({params.train.cpus_per_worker:g}) needs {needed:g} CPUs but the Ray cluster has {cpus:g}; "
                         "lower them, or add nodes")


def make_trainer(params: Params, config: dict[str, Any], name: str, use_gpu: bool, callbacks=None, storage_path=None,
                 train_fn=None):
    """The TorchTrainer for one training run (also used by each Tune trial, whose ``train_fn`` wraps the same loop)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = params.train
    resources = {"CPU": train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = train.gpus_per_worker
    return TorchTrainer(
        train_fn or ray_train_function,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=(train.min_workers, train.num_workers) if train.min_workers else train.num_workers,
            use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage_path or storage_uri(train.storage_path)),
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoint_num_to_keep),
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=callbacks,
        ),
    )


def storage_uri(path: Path | str) -> str:
    """Absolute local path, or a URI (s3://, gs://, ...) unchanged."""
    text = str(path)
    return text if "://" in text else str(resolve(text))


def worker_config(params: Params, run_id: str | None, tracking: str | None, lost_path: Path | None) -> dict[str, Any]:
    """The ``train_loop_config`` of a TorchTrainer: ``{"worker": WorkerConfig}``."""
    return {"worker": WorkerConfig(params, str(params.data.processed_path()), run_id, tracking,
                                   str(lost_path) if lost_path else None)}


# ----------------------------------------------------------------------------------------------------------
# MLflow on the driver
# ----------------------------------------------------------------------------------------------------------
def open_mlflow_run(params: Params, name: str, run_dir: Path | None, hashes: dict[str, str], tags: dict[str, str] | None = None):
    """Start (or, when resuming, reopen) this training run's MLflow run; returns (run_id, tracking URI).

    ``run_dir`` is the run's checkpoint folder, where the run id is kept so a resumed run logs to the same
    MLflow run; None for object-store storage (a resumed run then opens a new MLflow run)."""
    import mlflow
    import ray
    import torch

    from pipeline.tracking import tracking_uri

    uri = tracking_uri(params.mlflow.tracking_uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(params.mlflow.experiment_name)
    id_file = run_dir / RUN_ID_FILE if run_dir is not None else None
    if id_file is not None and id_file.is_file():
        run_id = id_file.read_text().strip()
        try:
            client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            return run_id, uri
        except Exception:  # noqa: BLE001 - the old run is gone (another tracking store): start a new one
            pass
    run = client.create_run(experiment_id, run_name=name, tags={
        "git_commit": git_commit(), "torch_version": torch.__version__, "ray_version": ray.__version__,
        "ray_train_run_name": name, "dataset": params.data.dataset, **hashes, **(tags or {}),
    })
    for key, value in flatten(params).items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_ID_FILE).write_text(run.info.run_id)
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
    with mlflow.start_run(run_id=run_id):
        with torch.no_grad():
            prediction = model(torch.from_numpy(example)).numpy()
        signature = mlflow.models.infer_signature(example, prediction)
        mlflow.pytorch.log_model(
            model, name="model", input_example=example, signature=signature, serialization_format="pickle",
            code_paths=[str(REPO_ROOT / "vae")], registered_model_name=params.mlflow.registered_model_name,
        )


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------
def write_outputs(state: dict[str, Any], name: str, run_id: str | None) -> dict[str, Any]:
    """models/vae/ (safetensors weights + config), reports/train_metrics.json and reports/train_curves.csv."""
    from safetensors.torch import save_file

    model_dir = resolve(MODEL_DIR)
    model_dir.mkdir(parents=True, exist_ok=True)
    tmp = model_dir / "model.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state["model"].items()}, str(tmp))
    os.replace(tmp, model_dir / "model.safetensors")
    atomic_write_text(model_dir / "model_config.json", json.dumps(state["model_config"], indent=2) + "\n")
    atomic_write_text(model_dir / "params.json", json.dumps(state["params"], indent=2) + "\n")
    history = state["history"]
    final = dict(history[-1]) if history else {}
    metrics = {**final, "run_name": name, "mlflow_run_id": run_id, "epochs": state["epoch"], "steps": state["step"]}
    atomic_write_text(MODEL_DIR / "run.json", json.dumps({"run_name": name, "mlflow_run_id": run_id}, indent=2) + "\n")
    atomic_write_text(METRICS_PATH, json.dumps(metrics, indent=2) + "\n")
    buffer = io.StringIO()
    if history:
        writer = csv.DictWriter(buffer, fieldnames=list(history[0].keys()), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    atomic_write_text(CURVES_PATH, buffer.getvalue())
    return metrics


def load_trained_model(model_dir: Path | str = MODEL_DIR):
    """The VAE written by the train stage (models/vae/). Raises FileNotFoundError naming the stage to run."""
    from safetensors.torch import load_file

    from vae.model import VAE

    model_dir = resolve(model_dir)
    if not (model_dir / "model.safetensors").is_file():
        raise FileNotFoundError(f"{model_dir}/model.safetensors is missing: run the train stage (`dvc repro train`)")
    model = VAE.from_config(json.loads((model_dir / "model_config.json").read_text()))
    model.load_state_dict(load_file(str(model_dir / "model.safetensors")))
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------
def train(params: Params, train_fn=None) -> dict[str, Any]:
    """Run the whole training on Ray and write the stage outputs. Returns the final metrics.

    ``train_fn`` replaces the workers' function (:func:`ray_train_function`); tests wrap it to inject faults.

    Raises:
        StageError: the data are missing, the cluster cannot be reached or lacks resources, the loss diverged
            (not retried), or training failed (after ``train.max_failures`` restarts); the message says which.
    """
    import numpy as np

    processed = params.data.processed_path()
    if not (processed / "train_images.npy").is_file():
        raise StageError(f"no preprocessed data in {processed}: run `dvc repro preprocess` first")
    hashes = data_hashes(processed)
    name = run_name(params, hashes)
    storage = storage_uri(params.train.storage_path)
    check_storage(storage)
    run_dir = None if "://" in storage else Path(storage) / name
    where = run_dir or f"{storage}/{name}"
    connect_ray(params)
    use_gpu = resolve_use_gpu(params)
    check_cpu_capacity(params, use_gpu)
    run_id, uri = open_mlflow_run(params, name, run_dir, hashes)
    config = worker_config(params, run_id, uri, run_dir / "lost_mlflow_records.json" if run_dir else None)
    clear_non_finite(storage, name)
    print(f"[train] run {name}: {params.train.num_workers} worker(s), {'GPU' if use_gpu else 'CPU'}, "
          f"checkpoints in {where}, MLflow run {run_id} at {uri}", flush=True)
    import mlflow

    client = mlflow.MlflowClient(uri)
    from ray.train import TrainingFailedError

    try:
        result = make_trainer(params, config, name, use_gpu, train_fn=train_fn).fit()
    except TrainingFailedError as error:
        client.set_terminated(run_id, status="FAILED")
        raise StageError(f"training failed (after up to {params.train.max_failures} restarts from the last "
                         f"checkpoint): {error}\nRe-running the stage resumes from the latest checkpoint in {where}.") from None
    diverged = non_finite_error(result.filesystem, result.path)
    if diverged:
        client.set_terminated(run_id, status="FAILED")
        raise StageError(f"training diverged (not retried: it would diverge again): {diverged}")
    state = final_state(result)
    if state is None:
        raise StageError(f"training finished without a checkpoint in {where}")
    metrics = write_outputs(state, name, run_id)
    model = load_trained_model()
    example = np.load(processed / "valid_images.npy", mmap_mode="r")[:2].copy()
    try:
        log_final_model(params, run_id, uri, model, example)
        client.log_artifact(run_id, str(resolve(METRICS_PATH)))
        client.set_terminated(run_id, status="FINISHED")
    except Exception as error:  # noqa: BLE001 - training is done; tracking trouble must not lose the outputs
        print(f"[train] MLflow: could not log the final model ({type(error).__name__}: {error}); the model is in "
              f"{resolve(MODEL_DIR)}", file=sys.stderr)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.train [--params PATH]``: exit status 0, or 1 with a clear message on stderr."""
    args = stage_argument_parser("pipeline.train", __doc__).parse_args(argv)

    def body() -> int:
        from pipeline.submit import should_submit, submit_stage

        params = with_best_params(load_params(args.params))
        if should_submit(params):
            return submit_stage("pipeline.train", params, args.params)
        metrics = train(params)
        print(f"[train] done: val -ELBO {metrics.get('val_negative_elbo', float('nan')):.3f} nats/image, "
              f"{metrics.get('val_bits_per_dim', float('nan')):.4f} bits/dim; model in {resolve(MODEL_DIR)}")
        return 0

    return run_stage("train", body)


if __name__ == "__main__":
    sys.exit(main())
