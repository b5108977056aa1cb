"""The cluster's MLflow tracking server (port base+3, on its own host with ``--hosts``).

Plain shape: a SQLite store and an artifact folder in the state folder. Team shape: the PostgreSQL store
(postgres.py), artifacts proxied to the bucket (clients need no S3 credentials), and MLflow's basic-auth app,
which reads its admin account and user database from an ini file (``MLFLOW_AUTH_CONFIG_PATH``, mode 0600).
MLflow's GenAI job runner (huey consumers) is off unless ``mlflow_jobs``: training never submits such jobs.
"""

from __future__ import annotations

import configparser
import io
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from infra.cluster import accounts, processes, tls
from infra.cluster import credentials as secret_files
from infra.cluster.environment import node_env
from infra.cluster.layout import ADMIN_USER, BUCKET, LOOPBACK, PIPELINE_USER, ClusterError, ClusterLayout
from infra.cluster.postgres import AUTH_DB, TRACKING_DB, postgres_url
from infra.cluster.tls import client_context


def write_auth_config(path: Path, pg_port: int, creds: dict[str, str], pg_host: str = LOOPBACK) -> None:
    """The basic-auth app's ini (``MLFLOW_AUTH_CONFIG_PATH``): users in PostgreSQL, the generated admin
    password, READ for new users by default. Mode 0600: it holds two passwords."""
    config = configparser.ConfigParser(interpolation=None)
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": postgres_url(pg_port, creds["postgres_password"], AUTH_DB, pg_host),
        "admin_username": ADMIN_USER,
        "admin_password": creds["mlflow_admin_password"],
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    buffer = io.StringIO()
    config.write(buffer)
    secret_files.write_private(path, buffer.getvalue())


def mlflow_team_args() -> list[str]:
    """``mlflow server`` arguments of the team deployment: artifacts proxied to the bucket (clients need no
    S3 credentials), the basic-auth app. The PostgreSQL store's URI holds its password, so it is never an
    argument (``/proc/<pid>/cmdline`` is world-readable): the server reads it from
    ``MLFLOW_BACKEND_STORE_URI`` (:func:`team_store_uri`), readable by its own user and root only."""
    return ["--app-name", "basic-auth", "--artifacts-destination", f"s3://{BUCKET}/mlflow"]


def team_store_uri(pg_port: int, creds: dict[str, str], pg_host: str = LOOPBACK) -> str:
    """The tracking store of the team deployment (PostgreSQL, with its password)."""
    return postgres_url(pg_port, creds["postgres_password"], TRACKING_DB, pg_host)


def _basic_auth_post(url: str, user: str, password: str, payload: dict, ca_path: Path | None = None) -> int:
    """POST ``payload`` as JSON with basic auth; the HTTP status (an error status too)."""
    import base64
    import json

    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode(),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=client_context(ca_path)) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def ensure_pipeline_account(mlflow_url: str, creds: dict[str, str], ca_path: Path | None = None) -> None:
    """Create the pipeline's MLflow account (``PIPELINE_USER``) as the admin, once. New users get READ on
    what others made (``default_permission``) and MANAGE on the experiments and models they create, and no
    user or permission management outside those: the pipeline logs to its own experiments.

    Raises:
        ClusterError: the server refused to create it for another reason than that it exists.
    """
    status = _basic_auth_post(
        f"{mlflow_url}/api/2.0/mlflow/users/create",
        ADMIN_USER,
        creds["mlflow_admin_password"],
        {"username": PIPELINE_USER, "password": creds["mlflow_pipeline_password"]},
        ca_path,
    )
    if status not in (200, 201, 400, 409):  # 400/409: RESOURCE_ALREADY_EXISTS
        raise ClusterError(f"MLflow refused to create the pipeline account {PIPELINE_USER!r} (HTTP {status})")


class MLflowServer:
    """Start, stop and health of the tracking server; its pid, log and (redacted) store in the state file."""

    def __init__(self, layout: ClusterLayout) -> None:
        self.layout = layout

    def _store_and_env(self) -> tuple[list[str], dict[str, str]]:
        """The store arguments of ``mlflow server`` and the server's environment."""
        layout, settings = self.layout, self.layout.settings
        env = node_env(layout, "mlflow")
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if settings.mlflow_jobs else "false"
        if not settings.team:
            env["MLFLOW_BACKEND_STORE_URI"] = f"sqlite:///{layout.mlflow_dir / 'mlflow.db'}"
            return ["--artifacts-destination", str(layout.mlflow_dir / "artifacts")], env
        creds, pg_host = layout.credentials(), layout.host_ip("postgres")
        write_auth_config(layout.auth_config_path, settings.postgres_port, creds, pg_host)
        env.update(
            MLFLOW_AUTH_CONFIG_PATH=str(layout.auth_config_path),
            MLFLOW_FLASK_SERVER_SECRET_KEY=creds["flask_secret_key"],
            MLFLOW_S3_ENDPOINT_URL=str(layout.s3_url),  # the server alone talks to the bucket
            MLFLOW_BACKEND_STORE_URI=team_store_uri(settings.postgres_port, creds, pg_host),
        )
        return mlflow_team_args(), env

    def _tls_args(self) -> list[str]:
        """``--uvicorn-opts`` with the server's certificate and key (``up --tls``), else nothing."""
        layout = self.layout
        if not layout.settings.tls:
            return []
        _, cert, key = tls.server_certificate(
            layout.tls_dir, [layout.host_ip("mlflow")], str(layout.cluster_id)
        )
        return ["--uvicorn-opts", f"--ssl-certfile {cert} --ssl-keyfile {key}"]

    def start(self, wait: bool = True) -> None:
        """Start (or restart, after :meth:`stop`) the tracking server on its recorded port.

        Raises:
            ClusterError: the cluster runs without MLflow (`up --no-mlflow`), the server is already running,
                or it did not answer within ``start_timeout_s`` (with ``wait``).
        """
        layout, settings = self.layout, self.layout.settings
        if not settings.mlflow:
            raise ClusterError("this cluster runs without an MLflow server (`up --no-mlflow`)")
        if processes.find(layout.cluster_id, "mlflow"):
            raise ClusterError("the MLflow server is already running")
        (layout.mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
        store, env = self._store_and_env()
        network = layout.network
        tls_args = self._tls_args()
        if owner := accounts.for_process(layout, "mlflow"):  # its store, auth config and TLS key only
            owner.give(layout.mlflow_dir, recursive=True)
            owner.give(*[path for path in (layout.auth_config_path, layout.tls_dir / tls.KEY_FILE)
                         if path.exists()])
        cmd = [
            *(network.exec_prefix("mlflow") if network else []),
            *accounts.run_as(layout, "mlflow"),
            sys.executable,
            "-m",
            "mlflow",
            "server",
            *store,
            "--host",
            layout.host_ip("mlflow"),
            "--port",
            str(settings.mlflow_port),
            "--workers",
            "1",
            *tls_args,
        ]
        log = layout.logs_dir / "mlflow.log"
        proc = processes.spawn(cmd, env, log, layout.mlflow_dir)
        store_uri = env["MLFLOW_BACKEND_STORE_URI"]
        layout.state["mlflow"] = {
            "pid": proc.pid,
            "url": layout.mlflow_url,
            "log": str(log),
            "backend_store_uri": secret_files.redact([store_uri], layout.credentials())[0]
            if settings.team
            else store_uri,
            "artifacts": cmd[cmd.index("--artifacts-destination") + 1],
        }
        layout.save()
        if wait:
            self.wait()

    def stop(self, sig: int = signal.SIGTERM, grace_s: float = 5.0) -> None:
        """Stop the server (``sig``, SIGKILL after ``grace_s``).

        Raises:
            ClusterError: a process survived SIGKILL.
        """
        left = processes.terminate(processes.find(self.layout.cluster_id, "mlflow"), sig=sig, grace_s=grace_s)
        if left:
            raise ClusterError(f"MLflow processes survived SIGKILL: {[processes.describe(p) for p in left]}")

    def healthy(self) -> bool:
        """Whether ``/health`` answers 200 within 2 s."""
        url = self.layout.mlflow_url
        if not url:
            return False
        try:
            context = tls.client_context(self.layout.ca_path)
            with urllib.request.urlopen(url + "/health", timeout=2, context=context) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait(self, timeout_s: float = 120.0) -> None:
        """Return once the server is healthy (with --team: and the pipeline's account exists).

        Raises:
            ClusterError: it exited, or did not answer within ``timeout_s`` (with the tail of its log).
        """
        layout = self.layout
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy():
                if layout.settings.team:
                    ensure_pipeline_account(str(layout.mlflow_url), layout.credentials(), layout.ca_path)
                return
            if not processes.find(layout.cluster_id, "mlflow"):
                break
            time.sleep(0.5)
        log = (
            Path(layout.state["mlflow"]["log"])
            if layout.state.get("mlflow")
            else layout.logs_dir / "mlflow.log"
        )
        raise ClusterError(
            f"MLflow server did not answer on {layout.mlflow_url}/health; {log}:\n{processes.tail(log)}"
        )
