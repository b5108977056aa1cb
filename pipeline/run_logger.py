"""The workers' MLflow logger, :class:`RunLogger`: records go to one MLflow run from a training process in a
thread of their own, so training never waits on, or dies with, the tracking server; each record reaches the
run exactly once however the attempts that log it die and resume (with a SQL store behind MLflow: see
:func:`pipeline.tracking.tracking_uri`). The stages' MLflow helpers are in :mod:`pipeline.tracking`."""

from __future__ import annotations

import json
import logging
import os
import queue
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import storage, storage_access

log = logging.getLogger(__name__)

# Fail fast on an unreachable server instead of MLflow's default minutes of retries; RunLogger retries itself.
FAST_FAIL_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def import_mlflow_modules(tracking_uri: str) -> None:
    """Import the MLflow modules a training process uses from its threads - the sender's client, store,
    entities and pictures, and the system-metrics monitor - in the calling thread, before those threads start.

    MLflow's packages import each other in cycles. A resumed attempt's sender thread sends its checkpoint's
    records at once while the training thread goes on importing MLflow (the system-metrics monitor): two
    threads entering the cycle from different modules can see one half-initialised ("cannot import name
    '_get_store' from partially initialized module 'mlflow.tracking'"), and every later send then fails.
    """
    import mlflow.entities  # noqa: F401
    import mlflow.system_metrics.system_metrics_monitor  # noqa: F401
    import mlflow.tracking.multimedia  # noqa: F401
    import mlflow.utils.mlflow_tags  # noqa: F401
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri)  # imports the store for this URI's scheme (REST, SQL); sends no request


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
        import_mlflow_modules(self.tracking_uri)
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
                    if not storage_access.is_uri(self.lost_path):
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


def start_system_metrics(run_id: str | None, tracking_uri: str, interval_s: float | None,
                         node: str | None = None):
    """Start MLflow's system-metrics monitor for this node, logging to ``run_id`` beside the model metrics:
    ``system/[<node>/]cpu_utilization_percentage``, ``system_memory_usage_megabytes``, disk and network, and
    with an NVIDIA GPU and ``nvidia-ml-py`` ``gpu_utilization_percentage`` and ``gpu_memory_usage_megabytes``
    (MLflow's ``SystemMetricsMonitor``; it resumes the step count of a resumed run).

    Args:
        run_id: the MLflow run; None (a rank that does not log) or ``interval_s`` None: nothing is started.
        interval_s: seconds between samples (``mlflow.system_metrics_interval_s``).
        node: the name that keeps several nodes' series apart, e.g. ``node-10.77.0.2``; None on one node.
    Returns:
        The started monitor (call ``finish()``), or None. A monitor that cannot start is logged and skipped:
        it never stops training.
    """
    if not run_id or not interval_s:
        return None
    for key, value in FAST_FAIL_ENV.items():  # its requests give up at once on a dead server, as RunLogger's
        os.environ.setdefault(key, value)
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, resume_logging=True,
                                       node_id=node, tracking_uri=tracking_uri)
        monitor.start()
        return monitor
    except Exception as error:  # noqa: BLE001 - the tracking server down must not stop training
        log.warning("system metrics not logged: %s", error)
        return None


def stop_system_metrics(monitor, timeout_s: float = 10.0) -> None:
    """Stop a monitor from :func:`start_system_metrics` (None: nothing), waiting at most ``timeout_s``: its
    last request may hang on an unreachable server, and the end of training must not wait for it."""
    if monitor is None:
        return
    stopper = threading.Thread(target=monitor.finish, name="system-metrics-stop", daemon=True)
    stopper.start()
    stopper.join(timeout_s)
