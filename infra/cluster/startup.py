"""How the local cluster starts (``up`` on an empty state folder): checks that it can (Ray's dashboard
modules, root for --hosts, free ports), a new token and state file, the hosts, the team services, MLflow,
the head, the workers in parallel; on any failure, everything started so far is stopped again."""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from typing import TYPE_CHECKING, Any

from infra.cluster import accounts, processes
from infra.cluster import hosts as hostnet
from infra.cluster.credentials import write_private
from infra.cluster.layout import HEAD, ClusterError, port_in_use
from infra.cluster.ray_nodes import missing_dashboard_modules

if TYPE_CHECKING:
    from infra.cluster.operator import LocalCluster


def check_can_start(cluster: LocalCluster) -> None:
    """Ray's dashboard modules, root for --hosts, a private temp root, free ports.

    Raises:
        ClusterError: one of them is missing (the message says what to do).
    """
    s = cluster.settings
    if why := missing_dashboard_modules():
        raise ClusterError(why)
    if s.hosts and (why := hostnet.available()):
        raise ClusterError(why)
    accounts.check_reachable(cluster)  # --hosts as root: each account can run the project from there
    # Ray's sockets and logs: refused if another user made it first.
    processes.private_folder(s.ray_temp_root, accounts.for_process(cluster, HEAD))
    busy = [port for port in s.ports() if port_in_use(port)]
    if busy:
        raise ClusterError(
            f"ports {busy} are in use; pick other ports with --base-port "
            f"(VAE_CLUSTER_BASE_PORT), now {s.base_port}"
        )


def new_state(cluster: LocalCluster) -> None:
    """The folders, a new cluster token (mode 0600 from the first byte) and a new state file."""
    folders = [
        cluster.state_dir,
        cluster.logs_dir,
        cluster.mlflow_dir,
        *([] if cluster.settings.team else [cluster.shared_storage]),
    ]
    for path in folders:
        path.mkdir(parents=True, exist_ok=True)
    cluster.token_path.unlink(missing_ok=True)
    with os.fdopen(os.open(cluster.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    if ray := accounts.for_process(cluster, HEAD):  # the nodes read the token; jobs write the shared folder
        ray.give(cluster.token_path, *([] if cluster.settings.team else [cluster.shared_storage]))
    cluster.state = {
        "cluster_id": secrets.token_hex(6),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "settings": cluster.settings.to_json(),
        "nodes": {},
        "mlflow": None,
    }
    cluster.save()


def make_hosts(cluster: LocalCluster) -> None:
    workers = [f"worker-{k}" for k in range(1, cluster.settings.num_workers + 1)]
    hosts = [*(["mlflow"] if cluster.settings.mlflow else []), *workers]
    cluster.network.create(hosts)
    cluster.state["hosts"] = {
        host: {
            "address": cluster.host_ip(host),
            "namespace": cluster.network.namespace(host),
            "link": cluster.network.veth(host) if host != HEAD else cluster.network.bridge,
        }
        for host in [HEAD, *hosts]
    }
    cluster.save()
    cluster._say(
        f"hosts on bridge {cluster.network.bridge}: "
        + ", ".join(f"{h} {v['address']}" for h, v in cluster.state["hosts"].items())
    )


def start_all(cluster: LocalCluster) -> dict[str, Any]:
    s = cluster.settings
    check_can_start(cluster)
    new_state(cluster)
    try:
        if cluster.network:
            make_hosts(cluster)
        if s.team:
            cluster.start_s3(new_key=True)
            cluster.start_postgres()
        if s.mlflow:
            cluster.start_mlflow(wait=False)
        cluster.start_node(HEAD)
        cluster.start_nodes([f"worker-{k}" for k in range(1, s.num_workers + 1)])
        cluster.wait_for_nodes(s.num_workers + 1, timeout_s=s.start_timeout_s)
        cluster._say(f"{s.num_workers + 1} nodes alive")
        if s.mlflow:
            cluster.wait_for_mlflow(timeout_s=s.start_timeout_s)
            cluster._say(f"MLflow answers on {cluster.mlflow_url}")
    except BaseException:
        with contextlib.suppress(Exception):
            cluster.down(keep_logs=True)
        raise
    # It holds the token path and, with --team, secrets: mode 0600.
    write_private(cluster.env_path, cluster.env_script())
    return cluster.status(note="started")
