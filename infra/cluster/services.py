"""What the cluster's services (the MLflow server, the S3 endpoint, PostgreSQL: one module each) share:
starting one as a marked process with its log and its redacted command in the state file, and waiting for
its port."""

from __future__ import annotations

import shlex
import socket
from pathlib import Path

import tenacity

from infra.cluster import credentials as secret_files
from infra.cluster import processes
from infra.cluster.environment import node_env
from infra.cluster.layout import LOOPBACK, ClusterError, ClusterLayout


class ServiceError(ClusterError):
    """A service did not start or stop; the message says what to fix."""


def start_service(
    layout: ClusterLayout, name: str, cmd: list[str], cwd: Path, env: dict[str, str] | None = None
) -> int:
    """Start service ``name`` in its own session, logging to logs/<name>.log, and record it (pid, log, the
    command with every secret redacted) in the state file; returns its pid."""
    log = layout.logs_dir / f"{name}.log"
    proc = processes.spawn(cmd, {**node_env(layout, name), **(env or {})}, log, cwd)
    shown = secret_files.redact(cmd, layout.credentials()) if layout.settings.team else cmd
    layout.state[name] = {"pid": proc.pid, "log": str(log), "command": shlex.join(shown)}
    layout.save()
    return proc.pid


def wait_for_port(port: int, timeout_s: float, host: str = LOOPBACK) -> None:
    """Return once something accepts TCP connections on ``host:port``.

    Raises:
        ServiceError: nothing did within ``timeout_s``.
    """
    try:
        retrying(timeout_s, 0.2, OSError)(lambda: socket.create_connection((host, port), timeout=1).close())
    except OSError:
        raise ServiceError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s") from None


def retrying(timeout_s: float, interval_s: float, errors: type[BaseException] | tuple) -> tenacity.Retrying:
    """The services' waits (tenacity): try again every ``interval_s`` while the call raises ``errors``,
    for at most ``timeout_s``; then the last error is raised."""
    return tenacity.Retrying(
        stop=tenacity.stop_after_delay(timeout_s),
        wait=tenacity.wait_fixed(interval_s),
        retry=tenacity.retry_if_exception_type(errors),
        reraise=True,
    )


def failed(layout: ClusterLayout, name: str, error: Exception) -> ClusterError:
    """A :class:`ClusterError` for a service that did not start: the error and the tail of its log."""
    log = layout.logs_dir / f"{name}.log"
    return ClusterError(f"{error}; {log}:\n{processes.tail(log)}")
