"""Ray at the edges of training: the Train worker session (checkpoints, divergence record), connecting to a
cluster, resource and storage checks that fail fast, and the ``TorchTrainer`` of a run or a Tune trial."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from pipeline import storage, storage_access
from pipeline.checkpoints import (
    checkpoint_epoch,
    newest_persisted_checkpoint,
    read_persisted_state,
    save_state,
)
from pipeline.common import StageError, resolve
from pipeline.config import Params
from pipeline.ray_connect import connect_ray, probe_address  # noqa: F401 - the stages' entry
from pipeline.sessions import NonFiniteLossError, WorkerConfig
from pipeline.train_loop import train_worker

# Written into the run's storage folder by rank 0 when the loss diverged: the workers then end normally, since
# Ray Train retries every worker exception (up to train.max_failures) and a divergence would only repeat.
NON_FINITE_FILE = "non_finite_loss.txt"
# Beside the checkpoints: the MLflow records a run could not log (pipeline.run_logger.RunLogger.close).
LOST_RECORDS_FILE = "lost_mlflow_records.json"


class RaySession:
    """:class:`pipeline.sessions.Session` on top of ``ray.train`` (inside a TorchTrainer worker)."""

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()
        # Where this rank runs, for the run's first log line (distinct hosts show distinct addresses).
        self.placement = {"node_ip": ray.util.get_node_ip_address(), "node_rank": context.get_node_rank()}
        quiet_report_logging()

    def load_checkpoint(self):
        """The state to resume from: Ray's registered checkpoint, or a newer one already on storage (see
        :func:`newest_persisted_checkpoint`). Rank 0 chooses and the other ranks load its choice, so every
        rank
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
        with storage.storage_filesystem.open_output_stream(
            f"{storage.experiment_fs_path}/{NON_FINITE_FILE}"
        ) as out:
            out.write(str(error).encode())


def quiet_report_logging() -> None:
    """Ray Train logs every ``ray.train.report`` of every rank at INFO ("Reporting training result N:
    TrainingReport(... the whole metrics dict ...) from rank R") and every checkpoint upload ("Checkpoint
    successfully created at: ..."), which bury rank 0's one line per epoch in a job's log (the run's first
    line names the checkpoint folder). The first logger is named after its file, so that name is looked up
    rather than typed."""
    import logging

    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: keep its logging as it is
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    logging.getLogger("ray.train.v2._internal.execution.storage").setLevel(logging.WARNING)


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's ``value`` on every rank of the initialised ``torch.distributed`` process group."""
    import torch
    import torch.distributed as dist

    box = [value]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    dist.broadcast_object_list(box, src=0, device=device)
    return box[0]


def ray_train_function(config: dict[str, Any], session: RaySession | None = None) -> None:
    """The function each Ray Train worker runs. A divergence (:class:`NonFiniteLossError`, raised on every
    rank at the same step) ends the workers normally after it is recorded: Ray would retry an exception from
    the last checkpoint, and the same data and weights would diverge again."""
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


def earlier_divergence(location: str, name: str, endpoint: str | None = None) -> str | None:
    """The divergence an earlier attempt of run ``name`` (in run storage ``location``) recorded, or None.

    A run that diverged is never resumed: the same weights, data and random state diverge again, and its
    MLflow run already holds the steps that led there (a resumed run would log them a second time)."""
    filesystem, root = storage_access.filesystem(location, endpoint)
    return non_finite_error(filesystem, f"{root}/{name}")


# What to say when a run diverged: what to change, not "re-run" (a re-run would diverge again).
DIVERGENCE_ADVICE = (
    "Change what makes it diverge - a lower train.learning_rate, train.grad_clip_norm, a longer beta warm-up "
    "or another train.seed - which starts a new run"
)


def check_storage(location: str, endpoint: str | None = None) -> None:
    """Fail fast when ``train.storage_path`` cannot be used (Ray would fail only at the first checkpoint,
    after an epoch of work): a local folder must be writable; an object-store URI must answer, accept the
    credentials and have its bucket (:func:`pipeline.storage_access.check_location`, within seconds).

    Raises:
        StageError: the folder cannot be created or written, or the store refuses (the message says why).
    """
    if storage_access.is_uri(location):
        storage_access.check_location(location, endpoint, "train.storage_path")
        return
    try:
        Path(location).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=location, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise StageError(
            f"train.storage_path {location!r} is not writable ({error.strerror or error}); point it at "
            "a folder you can write (on a multi-node cluster: storage all nodes share)"
        ) from None


def resolve_use_gpu(params: Params) -> bool:
    """train.use_gpu "auto" -> whether the cluster has GPUs; true with no GPU in the cluster is an error."""
    import ray

    cluster_gpus = ray.cluster_resources().get("GPU", 0)
    wanted = params.train.use_gpu
    workers = params.train.min_workers or params.train.num_workers
    if wanted is True and cluster_gpus < params.train.gpus_per_worker * workers:
        raise StageError(
            f"train.use_gpu is true with {workers} worker(s) x "
            f"{params.train.gpus_per_worker} GPU, but the Ray cluster has {cluster_gpus:g} GPU(s); "
            "lower train.num_workers / train.gpus_per_worker or set train.use_gpu: auto"
        )
    return bool(cluster_gpus > 0) if wanted == "auto" else bool(wanted)


def check_cpu_capacity(params: Params, use_gpu: bool) -> None:
    import ray

    cpus = ray.cluster_resources().get("CPU", 0)
    workers = params.train.min_workers or params.train.num_workers
    needed = workers * params.train.cpus_per_worker
    if needed > cpus and not os.environ.get("RAY_AUTOSCALER_ENABLED"):
        raise StageError(
            f"{workers} train worker(s) x train.cpus_per_worker "
            f"({params.train.cpus_per_worker:g}) needs {needed:g} CPUs but the Ray cluster has {cpus:g}; "
            "lower them, or add nodes"
        )


def make_trainer(
    params: Params,
    config: dict[str, Any],
    name: str,
    use_gpu: bool,
    callbacks=None,
    storage_path=None,
    train_fn=None,
):
    """The TorchTrainer for one training run (also used by each Tune trial, whose ``train_fn`` wraps the same
    loop)."""
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
            use_gpu=use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=name,
            **run_storage(str(storage_path or storage_uri(train.storage_path)), params),
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoint_num_to_keep),
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=callbacks,
        ),
    )


def run_storage(location: str, params: Params) -> dict[str, Any]:
    """``RunConfig`` storage arguments: a local folder as is; for a URI, ``storage_filesystem`` (pyarrow's S3
    filesystem with ``cluster.s3_endpoint_url`` and retries that outlast a short outage of the store, see
    :func:`pipeline.storage_access.filesystem`) and the path on it. Credentials come from each node's AWS
    environment, never from here."""
    if not storage_access.is_uri(location):
        return {"storage_path": location}
    filesystem, path = storage_access.filesystem(location, params.cluster.s3_endpoint_url)
    return {"storage_path": path, "storage_filesystem": filesystem}


def storage_uri(path: Path | str) -> str:
    """Absolute local path, or a URI (s3://, gs://, ...) unchanged."""
    text = str(path)
    return text if "://" in text else str(resolve(text))


def worker_config(
    params: Params, run_id: str | None, tracking: str | None, run_location: str
) -> dict[str, Any]:
    """The ``train_loop_config`` of a TorchTrainer: ``{"worker": WorkerConfig}``; MLflow records that never
    got through are listed in ``run_location`` (the run's storage folder, path or URI)."""
    lost = storage.join(run_location, LOST_RECORDS_FILE)
    return {"worker": WorkerConfig(params, params.data.processed_location(), run_id, tracking, lost)}
