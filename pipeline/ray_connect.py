"""Connecting a stage to Ray: ``cluster.address`` / ``RAY_ADDRESS`` / a new local instance, failing within
seconds with the fix in the message when an address is given but nothing answers there. A module of its own so
that a stage that only needs a connection (preprocess with Ray Data) does not import the training code."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from pipeline.common import StageError

if TYPE_CHECKING:
    from pipeline.config import Params


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
        raise StageError(
            f"cannot connect to the Ray cluster at {address!r}: {error}. Start it "
            "(`ray start --head`, or infra/local-cluster.sh up) or unset cluster.address / RAY_ADDRESS "
            "to train on a local Ray instance."
        ) from None


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
        raise StageError(
            f"no Ray cluster answers at {address!r} ({error}). Start it (`ray start --head`, or "
            "infra/local-cluster.sh up and `source` its env.sh) or unset cluster.address / RAY_ADDRESS "
            "to train on a local Ray instance."
        ) from None
