"""Everything MLflow for training runs: the tracking URI, runs opened and closed on the driver, the final
model, and :class:`RunLogger`, the non-blocking logger of workers (training never waits on, or dies with, the
tracking server). Sweeps' parent and trial runs are in ``pipeline.tune.tracking``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.common import REPO_ROOT, StageError, resolve
from pipeline.config import Params

RUN_ID_FILE = "mlflow_run_id"  # in a run's checkpoint folder: the MLflow run a resumed run logs to again

log = logging.getLogger(__name__)

# Fail fast on an unreachable server instead of MLflow's default minutes of retries; RunLogger retries itself.
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


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


@dataclass
class _Record:
    kind: str  # "metrics" | "image" | "params" | "tags"
    payload: Any
    step: int = 0
    key: str = ""
    attempts: int = 0
    # Set when the value is logged, not when it is sent: a record sent twice (a retry, or a resumed run
    # re-sending its checkpoint's records) is then the same row, which MLflow's SQL stores (SQLite,
    # PostgreSQL, MySQL: what a tracking server runs on) keep once; a file store would append it again.
    timestamp_ms: int = field(default_factory=lambda: int(time.time() * 1000))


@dataclass
class RunLogger:
    """Logs to one MLflow run from a training process without ever blocking or failing training.

    With ``hold_until_commit`` (training), records wait until :meth:`commit`, which the training loop calls
    once the checkpoint that covers them is written: an attempt that dies before its next checkpoint has
    sent nothing that the resumed attempt will log again, so every step and epoch has one value in MLflow.
    The records not yet confirmed sent (held, or committed but still queued or waiting for the server)
    also travel in the checkpoint (:meth:`held_records`, :meth:`resend`), so those of an attempt that died
    before sending them are sent by the next. A record sent twice stays one: a metric row keeps the
    timestamp it was logged with (SQL stores keep one row), and a picture is written under a name made of
    the run, key, step and that timestamp (:func:`picture_name`), so a second write replaces the first.

    Args:
        run_id: the MLflow run (opened by the driver).
        tracking_uri: where the run lives.
        lost_path: where to write what could not be logged by :meth:`close` (a path or a URI: the run's
            storage folder, local or s3://).
        hold_until_commit: keep records until :meth:`commit` instead of sending them at once.
    """

    run_id: str | None
    tracking_uri: str
    lost_path: str | None = None
    hold_until_commit: bool = False
    _held: list = field(default_factory=list)
    _unsent: dict = field(default_factory=dict)  # id -> record, committed and not yet confirmed sent
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _queue: queue.Queue = field(default_factory=queue.Queue)
    _failed: list = field(default_factory=list)
    _errors: list = field(default_factory=list)
    _thread: threading.Thread | None = None
    _closing: threading.Event = field(default_factory=threading.Event)
    _failing_since: float | None = None  # monotonic time of the first failure of the current outage

    def __post_init__(self) -> None:
        if self.run_id is None:
            return
        for key, value in FAST_FAIL_ENV.items():
            os.environ.setdefault(key, value)
        self._thread = threading.Thread(target=self._work, name="mlflow-logger", daemon=True)
        self._thread.start()

    # -- public, non-blocking ------------------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id:
            self._put(_Record("metrics", {k: float(v) for k, v in metrics.items()}, step))

    def log_image(self, image: np.ndarray, key: str, step: int) -> None:
        if self.run_id:
            self._put(_Record("image", image, step, key))

    def _put(self, record: _Record) -> None:
        if self.hold_until_commit:
            self._held.append(record)
        else:
            self._enqueue(record)

    def _enqueue(self, record: _Record) -> None:
        with self._lock:
            self._unsent[id(record)] = record
        self._queue.put(record)

    def held_records(self) -> list[dict[str, Any]]:
        """The records not yet confirmed sent - waiting for :meth:`commit`, or committed and still queued or
        kept for a retry - as plain data for a checkpoint (``torch.load(weights_only=True)`` reads it back):
        ``{"metrics": {name: value}, "step", "timestamp_ms"}`` or ``{"image": uint8 tensor (H, W[, C]),
        "key", "step", "timestamp_ms"}``."""
        import torch

        with self._lock:
            unsent = list(self._unsent.values())
        records = []
        for r in [*unsent, *self._held]:
            if r.kind == "metrics":
                records.append({"metrics": r.payload, "step": r.step, "timestamp_ms": r.timestamp_ms})
            else:
                image = torch.from_numpy(np.ascontiguousarray(r.payload))
                records.append({"image": image, "key": r.key, "step": r.step, "timestamp_ms": r.timestamp_ms})
        return records

    def commit(self) -> None:
        """Send everything held so far (its checkpoint is written)."""
        held, self._held = self._held, []
        for record in held:
            self._enqueue(record)

    def resend(self, records: list[dict[str, Any]]) -> None:
        """Send again the :meth:`held_records` of a checkpoint; what already reached MLflow stays single."""
        if self.run_id:
            for item in records:
                if "image" in item:
                    record = _Record("image", item["image"].numpy(), int(item["step"]), str(item["key"]),
                                     timestamp_ms=int(item["timestamp_ms"]))
                else:
                    record = _Record("metrics", dict(item["metrics"]), int(item["step"]),
                                     timestamp_ms=int(item["timestamp_ms"]))
                self._enqueue(record)

    def drain(self, timeout_s: float = 10.0) -> bool:
        """Wait (up to ``timeout_s``) until every record queued so far (committed, with ``hold_until_commit``)
        has been handled: sent, or kept for a retry when the server is away. Returns whether the queue
        drained."""
        if self._thread is None:
            return True
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def close(self, timeout_s: float = 60.0) -> dict[str, Any]:
        """Flush (waiting up to ``timeout_s`` for the server), then record what was lost.

        Every record handed to the sender and not confirmed sent is reported lost - also those the sender
        thread still holds when a hanging server (requests that time out rather than fail) outlasts
        ``timeout_s``; the thread then stops after its current request and sends nothing more. A record
        whose request was in flight at that moment is listed as lost and may still have arrived. Records
        held for a :meth:`commit` that never came are dropped on purpose (the resumed attempt logs them).

        Returns:
            {"sent_all": bool, "lost_records": int, "errors": [first error messages]}
        """
        if not self.run_id or self._thread is None:
            return {"sent_all": True, "lost_records": 0, "errors": []}
        deadline = time.monotonic() + timeout_s
        self._queue.put(None)
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():  # the sender is done: the server may be back, one more pass here
            while self._failed and time.monotonic() < deadline:
                self._retry_failed()
                if self._failed:
                    time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))
        self._closing.set()  # a sender still waiting on the server sends nothing after this
        with self._lock:
            pending = list(self._unsent.values())
        summary = {"sent_all": not pending, "lost_records": len(pending), "errors": self._errors[:5]}
        if pending:
            lost = [
                {
                    "kind": r.kind,
                    "step": r.step,
                    "key": r.key,
                    "payload": r.payload
                    if r.kind == "metrics"
                    else f"image {getattr(r.payload, 'shape', '')}",
                }
                for r in pending
            ]
            if self.lost_path is not None:
                listing = {"run_id": self.run_id, "errors": self._errors[:20], "records": lost}
                try:
                    if not storage.is_uri(self.lost_path):
                        Path(self.lost_path).parent.mkdir(parents=True, exist_ok=True)
                    storage.write_bytes(str(self.lost_path), json.dumps(listing, indent=1).encode())
                except Exception as error:  # noqa: BLE001 - the log line below still says how many
                    log.warning("MLflow: could not list the lost records in %s: %s", self.lost_path, error)
            try:
                self._client().set_tag(
                    self.run_id, "mlflow.lost_records", f"{len(pending)} records, see {self.lost_path}"
                )
            except Exception:  # noqa: BLE001 - the server is still away; the file says it
                pass
            log.warning(
                "MLflow: %d records could not be logged (%s); listed in %s",
                len(pending),
                "; ".join(self._errors[:2]),
                self.lost_path,
            )
        return summary

    # -- background thread ---------------------------------------------------------------------------------
    def _client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.tracking_uri)

    def _send(self, group: list[_Record]) -> None:
        """One request: a group of metric records as one ``log_batch``, or one image."""
        client = self._client()
        if group[0].kind == "metrics":
            from mlflow.entities import Metric

            client.log_batch(
                self.run_id,
                metrics=[Metric(k, v, r.timestamp_ms, r.step) for r in group for k, v in r.payload.items()],
                synchronous=True,
            )
        else:
            (record,) = group
            log_picture(client, self.run_id, record.payload, record.key, record.step, record.timestamp_ms)

    def _send_or_keep(self, group: list[_Record]) -> bool:
        """Send ``group``; on any failure keep all of it, in order, for a retry. Returns whether it went."""
        try:
            self._send(group)
            with self._lock:
                for record in group:
                    self._unsent.pop(id(record), None)
            if self._failing_since is not None:
                log.warning("MLflow: sending again after %.0f s; the records kept meanwhile follow",
                            time.monotonic() - self._failing_since)
                self._failing_since = None
            return True
        except Exception as error:  # noqa: BLE001 - any failure: keep the records, training goes on
            for record in group:
                record.attempts += 1
            message = f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
            if len(self._errors) < 50:
                self._errors.append(message)
            if self._failing_since is None:
                log.warning("MLflow: could not send (%s); training goes on, the records are kept and retried",
                            message)
                self._failing_since = time.monotonic()
            self._failed.extend(group)
            return False

    def _send_in_order(self, records: list[_Record]) -> None:
        """Send ``records`` in :func:`request_groups`, in order, up to the first group that fails (it and the
        rest are kept for a retry), or until :meth:`close` gave up."""
        groups = request_groups(records)
        for index, group in enumerate(groups):
            if self._closing.is_set():
                self._failed.extend(r for rest in groups[index:] for r in rest)
                return
            if not self._send_or_keep(group):
                self._failed.extend(r for rest in groups[index + 1 :] for r in rest)
                return

    def _retry_failed(self) -> None:
        retry, self._failed = self._failed, []
        self._send_in_order(retry)

    def _work(self) -> None:
        backoff = 1.0
        while not self._closing.is_set():
            try:
                items = [self._queue.get(timeout=backoff if self._failed else None)]
            except queue.Empty:
                items = ["retry"]
            while items[-1] is not None and len(items) < MAX_RECORDS_PER_PASS:  # whatever else is waiting
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                backoff = self._handle([item for item in items if isinstance(item, _Record)], backoff)
            finally:
                for item in items:
                    if item != "retry":
                        self._queue.task_done()
            if items[-1] is None:
                return

    def _handle(self, records: list[_Record], backoff: float) -> float:
        """Send ``records`` after any earlier failures, kept in order; returns the next retry backoff in
        seconds."""
        if self._failed:
            self._retry_failed()
            backoff = 1.0 if not self._failed else min(backoff * 2, 30.0)
        if records:
            if self._failed or self._closing.is_set():
                self._failed.extend(records)
            else:
                self._send_in_order(records)
        return backoff


def picture_name(run_id: str, key: str, step: int, timestamp_ms: int) -> str:
    """The artifact name of a picture in MLflow's series layout (``images/<key>+step+<step>+timestamp+<ms>+
    <id>``, what its UI's image slider reads), with an id derived from run, key and step instead of
    ``MlflowClient.log_image``'s random one: the same picture sent again gets the same name."""
    identity = uuid.uuid5(uuid.NAMESPACE_URL, f"mlflow-run:{run_id}/{key}/{step}")
    return f"{key.replace('/', '~')}+step+{step}+timestamp+{timestamp_ms}+{identity}"


def log_picture(client, run_id: str, image: np.ndarray, key: str, step: int, timestamp_ms: int) -> None:
    """What ``client.log_image(run_id, image, key=key, step=step, timestamp=timestamp_ms)`` writes - the
    PNG, its compressed .webp preview and the run's logged-images tag - under :func:`picture_name`, so a
    second send replaces the first instead of adding a copy.

    Args:
        image: uint8 (H, W) or (H, W, C). timestamp_ms: when the picture was made (ms since the epoch).
    """
    from mlflow.tracking.multimedia import compress_image_size, convert_to_pil_image
    from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_IMAGES

    picture = convert_to_pil_image(image)
    name = picture_name(run_id, key, step, timestamp_ms)
    with tempfile.TemporaryDirectory(prefix="mlflow-picture-") as folder:
        picture.save(Path(folder) / f"{name}.png")
        compress_image_size(picture).save(Path(folder) / f"{name}+compressed.webp")
        client.log_artifacts(run_id, folder, "images")
    client.set_tag(run_id, MLFLOW_LOGGED_IMAGES, "true", synchronous=True)


# A training process logs a record per logged step, faster than one request each can go (a tracking server
# behind basic-auth checks the password on every request): what is waiting goes in few requests.
MAX_RECORDS_PER_PASS = 500
MAX_METRICS_PER_REQUEST = 1000  # MLflow's limit for one log_batch


def request_groups(records: list[_Record]) -> list[list[_Record]]:
    """``records`` in the order given, as the requests that send them: consecutive metric records together
    (at most :data:`MAX_METRICS_PER_REQUEST` values a request), each image alone."""
    groups: list[list[_Record]] = []
    size = 0
    for record in records:
        joins = (record.kind == "metrics" and groups and groups[-1][0].kind == "metrics"
                 and size + len(record.payload) <= MAX_METRICS_PER_REQUEST)
        if joins:
            groups[-1].append(record)
            size += len(record.payload)
        else:
            groups.append([record])
            size = len(record.payload) if record.kind == "metrics" else 0
    return groups


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
