"""What a runner and the training loop agree on: the worker's configuration, the :class:`Session` the loop
reports to (Ray Train, a Tune trial, or :class:`LocalSession` on a folder), and the one error no runner
retries."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

from pipeline.checkpoints import load_state, save_state
from pipeline.config import Params


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; training stops before the weights are touched.

    Deterministic (the same data and weights diverge again), so runners must not retry it."""


@dataclass(frozen=True)
class WorkerConfig:
    """What every training worker receives.

    Attributes:
        params: the validated configuration (a trial's own, inside a Tune sweep).
        processed_dir: absolute path or URI (s3://...) of the preprocessed arrays (URIs: read through
            each node's cache, pipeline.storage.local_dataset).
        mlflow_run_id: the MLflow run rank 0 logs into (opened by the driver); None: no tracking.
        tracking_uri: where that run lives. lost_records_path: where MLflow records that never got through are
        listed.
    """

    params: Params
    processed_dir: str
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    lost_records_path: str | None = None


class Session(Protocol):
    """What the loop needs from its runner (Ray Train, a Tune trial, or a local folder)."""

    world_rank: int
    world_size: int
    local_rank: int
    # Where this rank runs ({"node_ip": str, "node_rank": int}) when a cluster placed it; None in-process.
    placement: dict[str, Any] | None

    def load_checkpoint(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, epoch: int) -> None: ...

    def should_continue(self, epoch: int) -> bool: ...


class LocalSession:
    """Runs the loop without Ray: checkpoints in ``directory``/checkpoint_<epoch>/ (the newest ``num_to_keep``
    kept), reported metrics in :attr:`reports`. With ``world_size > 1`` every rank of an initialised
    ``torch.distributed`` group makes its own session on the same folder; rank 0 writes."""

    local_rank = 0
    placement = None

    def __init__(self, directory: Path | str, num_to_keep: int = 2, world_rank: int = 0, world_size: int = 1):
        self.directory = Path(directory)
        self.num_to_keep = num_to_keep
        self.world_rank, self.world_size = world_rank, world_size
        self.reports: list[dict[str, float]] = []

    def _checkpoints(self) -> list[Path]:
        return sorted(self.directory.glob("checkpoint_*"))

    def load_checkpoint(self) -> dict[str, Any] | None:
        checkpoints = [c for c in self._checkpoints() if (c / "state.pt").is_file()]
        return load_state(checkpoints[-1]) if checkpoints else None

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, epoch: int) -> None:
        self.reports.append(dict(metrics))
        if state is not None and self.world_rank == 0:
            save_state(state, self.directory / f"checkpoint_{epoch:06d}")
            for old in self._checkpoints()[: -self.num_to_keep]:
                shutil.rmtree(old, ignore_errors=True)
        if self.world_size > 1:
            dist.barrier()

    def should_continue(self, epoch: int) -> bool:
        return True
