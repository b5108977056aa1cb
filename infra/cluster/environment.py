"""The environment of the cluster's clients (a shell, a test, a DVC stage: ``env.sh``) and of its processes
(Ray nodes and services: the client's, plus the markers that :func:`infra.cluster.processes.find` looks for,
each worker host's own HOME/TMPDIR/cache with ``--hosts``, and the interface torch.distributed must use)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from infra.cluster import accounts
from infra.cluster.layout import MARKER, NODE_MARKER, PIPELINE_USER, REGION, SERVICES, ClusterLayout

# Environment variables that would point our processes at another cluster or another token.
FOREIGN_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
)


def client_env(layout: ClusterLayout) -> dict[str, str]:
    """The variables a client (shell, test, DVC stage) needs to use this cluster."""
    settings = layout.settings
    env = {
        "RAY_ADDRESS": layout.address,
        "RAY_API_SERVER_ADDRESS": layout.dashboard_url,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(layout.token_path),
    }
    if not settings.team:
        env["VAE_SHARED_STORAGE"] = str(layout.shared_storage)
    if layout.mlflow_url:
        env["MLFLOW_TRACKING_URI"] = layout.mlflow_url
    if layout.ca_path and layout.mlflow_url:
        env["MLFLOW_TRACKING_SERVER_CERT_PATH"] = str(layout.ca_path)  # MLflow's client verifies with it
    if settings.team:
        creds = layout.credentials()
        env.update(
            VAE_BUCKET=str(layout.bucket_uri),
            AWS_ENDPOINT_URL=str(layout.s3_url),
            AWS_DEFAULT_REGION=REGION,
            # Not the admin: jobs and shells can log and create experiments, not manage users or permissions.
            MLFLOW_TRACKING_USERNAME=PIPELINE_USER,
            MLFLOW_TRACKING_PASSWORD=creds["mlflow_pipeline_password"],
        )
        if "aws_access_key_id" in creds:  # set when the S3 endpoint starts
            env.update(
                AWS_ACCESS_KEY_ID=creds["aws_access_key_id"],
                AWS_SECRET_ACCESS_KEY=creds["aws_secret_access_key"],
            )
    return env


def subprocess_env(layout: ClusterLayout, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: os.environ) with foreign Ray settings removed and this cluster's set."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in FOREIGN_ENV}
    env.update(client_env(layout))
    return env


def node_env(layout: ClusterLayout, node: str) -> dict[str, str]:
    """The environment of node ``node``'s processes ("head", "worker-K", or a service name)."""
    settings, network = layout.settings, layout.network
    env = subprocess_env(layout)
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key)
    # Jobs run `python ...` through a shell on the head: it must be this venv's python.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(settings.ray_env)
    if (settings.team or settings.hosts) and node not in SERVICES:
        env["VAE_DATA_CACHE"] = str(layout.node_cache(node))  # each node its own, nothing shared
    if network and node not in SERVICES:
        # The hosts share this machine's hostname, which resolves to loopback; torch.distributed must take
        # the host's own interface (a real host's hostname resolves to its address).
        interface = "eth0" if node.startswith("worker-") else network.bridge
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = interface
    owner = accounts.for_process(layout, node)
    if (network and node.startswith("worker-")) or owner:
        # A host's own HOME and TMPDIR; a process under an account of its own (accounts.py) cannot use
        # root's, and gets its folders.
        for key, sub in (("HOME", "home"), ("TMPDIR", "tmp"), ("XDG_CACHE_HOME", "home/.cache")):
            (layout.host_dir(node) / sub).mkdir(parents=True, exist_ok=True)
            env[key] = str(layout.host_dir(node) / sub)
        if owner:
            owner.give(layout.host_dir(node), recursive=True)
            env["USER"] = env["LOGNAME"] = owner.name
    env[MARKER] = str(layout.cluster_id)
    env[NODE_MARKER] = f"{layout.cluster_id}/{node}"
    return env


def env_script(layout: ClusterLayout) -> str:
    """``env.sh``: the client's variables as shell exports."""
    lines = [f"# Local Ray cluster {layout.cluster_id} ({layout.state_dir}); `source` this file."]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in client_env(layout).items()]
    return "\n".join(lines) + "\n"
