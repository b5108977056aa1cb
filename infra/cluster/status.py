"""What `status` reports: the nodes as Ray sees them and as the process table shows them, the hosts and
their links, the services' health - as a dict (``status --json``) and as text."""

from __future__ import annotations

import urllib.error
from typing import TYPE_CHECKING, Any

from infra.cluster import processes
from infra.cluster.layout import GIB, HEAD, SERVICES

if TYPE_CHECKING:
    from infra.cluster.operator import LocalCluster


def _process_table(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    by_node = {}
    for name in [*cluster.state.get("nodes", {}), *(s for s in SERVICES if cluster.state.get(s))]:
        procs = cluster.processes(name)
        raylets = [p.pid for p in procs if processes.name(p) == "raylet"]
        by_node[name] = {
            "processes": len(procs),
            "raylet_pid": raylets[0] if raylets else None,
            "address": cluster.host_ip(name),
        }
        if cluster.network and name in cluster.state.get("hosts", {}) and name != HEAD:
            by_node[name]["link_up"] = cluster.network.link_up(name)
    return by_node


def _ray_table(cluster: LocalCluster) -> tuple[list[dict[str, Any]], str | None]:
    try:
        return [
            {
                "node_id": n["node_id"],
                "node_ip": n.get("node_ip"),
                "head": n.get("is_head_node", False),
                "state": n["state"],
                "resources": n.get("resources_total", {}),
            }
            for n in cluster.nodes()
        ], None
    except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
        return [], str(exc)


def cluster_status(cluster: LocalCluster, note: str = "") -> dict[str, Any]:
    """What runs: nodes (from Ray and from the processes), addresses, hosts, services' health. ``healthy``
    is true when every node is alive, every link up and every service answers."""
    if not cluster.state:
        return {"up": False, "state_dir": str(cluster.state_dir), "note": note or "not up"}
    settings = cluster.settings
    by_node = _process_table(cluster)
    ray_nodes, ray_error = _ray_table(cluster)
    alive = sum(1 for n in ray_nodes if n["state"] == "ALIVE")
    expected = len(cluster.state.get("nodes", {}))
    team = settings.team
    return {
        "up": alive > 0,
        "healthy": alive == expected
        and (cluster.mlflow_healthy() or not settings.mlflow)
        and all(info.get("link_up", True) for info in by_node.values())
        and (not team or bool(cluster.processes("postgres") and cluster.s3_healthy())),
        "note": note,
        "cluster_id": cluster.cluster_id,
        "state_dir": str(cluster.state_dir),
        "address": cluster.address,
        "dashboard_url": cluster.dashboard_url,
        "mlflow_url": cluster.mlflow_url,
        "mlflow_healthy": cluster.mlflow_healthy(),
        "shared_storage": None if team else str(cluster.shared_storage),
        "s3_url": cluster.s3_url,
        "bucket": cluster.bucket_uri,
        "s3_healthy": cluster.s3_healthy() if team else None,
        "postgres_port": settings.postgres_port if team else None,
        "postgres_address": f"{cluster.host_ip('postgres')}:{settings.postgres_port}" if team else None,
        "env_file": str(cluster.env_path),
        "alive_nodes": alive,
        "expected_nodes": expected,
        "ray_nodes": ray_nodes,
        "ray_error": ray_error,
        "processes": by_node,
        "hosts": cluster.state.get("hosts"),
    }


def _node_lines(status: dict[str, Any]) -> list[str]:
    lines = []
    for node in sorted(status["ray_nodes"], key=lambda n: (not n["head"], n["state"] != "ALIVE")):
        resources = node["resources"]
        lines.append(
            f"  {'head  ' if node['head'] else 'worker'} {node['node_id'][:12]}"
            f"  {node.get('node_ip') or '':<13}  {node['state']:<5}"
            f"  CPU {resources.get('CPU', 0):g}  GPU {resources.get('GPU', 0):g}"
            f"  memory {resources.get('memory', 0) / GIB:.1f} GiB"
        )
    if status.get("ray_error"):
        lines.append(f"  (Ray did not answer: {status['ray_error']})")
    return lines


def _storage_lines(status: dict[str, Any]) -> list[str]:
    if status.get("shared_storage"):
        return [f"  Shared storage for train.storage_path: {status['shared_storage']}"]
    return [
        f"  S3 endpoint: {status['s3_url']}, bucket {status['bucket']}"
        + ("  (healthy)" if status.get("s3_healthy") else "  (NOT answering)"),
        f"  PostgreSQL (MLflow's store): {status['postgres_address']}",
    ]


def format_status(status: dict[str, Any]) -> str:
    """The text of `status` (and of `up`)."""
    if not status.get("alive_nodes") and not status.get("cluster_id"):
        return f"Local Ray cluster: not up (state dir {status['state_dir']})."
    mlflow = status["mlflow_url"] or "not started"
    if status["mlflow_url"]:
        mlflow += "  (healthy)" if status["mlflow_healthy"] else "  (NOT answering)"
    hosts = status.get("hosts")
    return "\n".join(
        [
            f"Local Ray cluster {status['cluster_id']}: {status['alive_nodes']}/{status['expected_nodes']} "
            f"nodes alive{' -- ' + status['note'] if status.get('note') else ''}",
            *_node_lines(status),
            f"  Ray address (ray.init, ray status): {status['address']}",
            f"  Dashboard + job API (ray job submit): {status['dashboard_url']}",
            f"  MLflow tracking server: {mlflow}",
            *_storage_lines(status),
            *(
                [
                    "  Hosts (own network namespaces): "
                    + ", ".join(f"{host} {info['address']}" for host, info in hosts.items())
                ]
                if hosts
                else []
            ),
            "  Processes: "
            + ", ".join(
                f"{name} {info['processes']}"
                + ("" if name in SERVICES else f" (raylet {info['raylet_pid'] or 'DOWN'})")
                + (" [link CUT]" if info.get("link_up") is False else "")
                for name, info in status["processes"].items()
            ),
            f"Use it from a shell:  source {status['env_file']}",
        ]
    )
