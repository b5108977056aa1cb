"""How the local cluster stops (``down``): the team services first (MLflow, the S3 endpoint, then
PostgreSQL after its clients), then every marked process with its descendants (the GCS last), the hosts'
links whatever happened, the state files; the data are kept unless ``wipe``."""

from __future__ import annotations

import shutil
import signal
from typing import TYPE_CHECKING, Any

from infra.cluster import processes
from infra.cluster.layout import ClusterError

if TYPE_CHECKING:
    from infra.cluster.operator import LocalCluster


def stop_team_services(cluster: LocalCluster, grace_s: float, wipe: bool) -> list[str]:
    """Stop MLflow, the S3 endpoint (its objects are on disk already), then PostgreSQL (after its
    clients). Returns what was kept."""
    kept = []
    processes.terminate(cluster.processes("mlflow"), grace_s=grace_s)
    if cluster.processes("s3"):
        processes.terminate(cluster.processes("s3"), grace_s=grace_s)
        if not wipe:
            stored = cluster.s3_store.rglob("*")
            objects = sum(1 for p in stored if p.is_file() and not p.name.startswith("."))
            kept.append(f"{objects} S3 objects in {cluster.s3_store}")
    cluster.postgres.stop()
    if not wipe:
        kept.append(f"the PostgreSQL data in {cluster.postgres_dir}")
    return kept


def stop_all(cluster: LocalCluster, grace_s: float) -> list[str]:
    """Stop every process of the cluster: raylets and the rest first, the GCS last (as `ray stop` does:
    others complain when it goes first), then anything spawned meanwhile. Returns what was stopped."""
    procs = cluster.processes()
    described = [processes.describe(p) for p in procs]
    gcs = [p for p in procs if processes.name(p) == "gcs_server"]
    survivors = processes.terminate([p for p in procs if p not in gcs], grace_s=grace_s)
    survivors += processes.terminate(gcs, grace_s=2.0)
    survivors += processes.terminate(cluster.processes(), sig=signal.SIGKILL, grace_s=2.0)
    if survivors:
        raise ClusterError(f"processes survived SIGKILL: {[processes.describe(p) for p in survivors]}")
    return described


def down(
    cluster: LocalCluster, keep_logs: bool = False, grace_s: float = 3.0, wipe: bool = False
) -> dict[str, Any]:
    """Stop every process of this cluster (workers, head, MLflow, and with --team the S3 endpoint and
    PostgreSQL) and remove the state files. The data stay (the bucket's objects, the
    PostgreSQL data directory and node caches are kept) unless ``wipe``."""
    if not cluster.state:
        removed = cluster.network.remove() if cluster.network else []  # a failed `up --hosts` leaves links
        gone = f"; removed {len(removed)} leftover namespaces and links" if removed else ""
        if wipe:
            wipe_data(cluster)
            return {"stopped": [], "note": f"no cluster running in {cluster.state_dir}; data wiped{gone}"}
        return {"stopped": [], "note": f"no cluster state in {cluster.state_dir}; nothing to stop{gone}"}
    kept = stop_team_services(cluster, grace_s, wipe) if cluster.settings.team else []
    try:
        described = stop_all(cluster, grace_s)
    finally:  # the links go whatever happened to the processes
        removed = cluster.network.remove() if cluster.network else []
    temp_root = cluster.settings.ray_temp_root
    if keep_logs and temp_root and temp_root.exists():
        kept.append(f"Ray's logs in {temp_root}")
    cleanup_files(cluster, keep_logs=keep_logs)
    if wipe:
        wipe_data(cluster)
    else:
        for path, what in (
            (cluster.mlflow_dir, "the MLflow store"),
            (cluster.shared_storage, "the shared folder"),
            (cluster.state_dir / "nodes", "the nodes' folders"),
            (cluster.logs_dir, "the start logs"),
        ):
            if path.exists():
                kept.append(f"{what} in {path}")
    note = f"stopped {len(described)} processes"
    note += f"; removed the hosts' {len(removed)} namespaces and links" if removed else ""
    note += f"; kept {', '.join(kept)}" if kept else ""
    return {"stopped": described, "note": note + ("; data wiped" if wipe else "")}


def wipe_data(cluster: LocalCluster) -> None:
    """Remove the kept data: saved bucket, PostgreSQL data, node caches, MLflow data, secrets."""
    cluster.postgres.wipe()
    for path in (
        cluster.saved_bucket,
        cluster.s3_store,
        cluster.state_dir / "nodes",
        cluster.mlflow_dir,
        cluster.shared_storage,
    ):
        shutil.rmtree(path, ignore_errors=True)
    for path in (cluster.credentials_path, cluster.s3_keys_path, cluster.auth_config_path):
        path.unlink(missing_ok=True)


def cleanup_files(cluster: LocalCluster, keep_logs: bool) -> None:
    temp_root = cluster.settings.ray_temp_root
    if not keep_logs and temp_root and temp_root.exists():
        shutil.rmtree(temp_root, ignore_errors=True)
    for path in (cluster.env_path, cluster.token_path, cluster.state_path):
        path.unlink(missing_ok=True)
    cluster.state = {}
