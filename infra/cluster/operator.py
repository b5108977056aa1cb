"""The operator's verbs on one local cluster: ``up`` (or restore what died), ``down``, ``restart-node``,
``partition``/``heal``, the MLflow server's stop/start/restart, ``logs`` and ``status``.

:class:`LocalCluster` is the Python API the tests use; it is a :class:`ClusterLayout` (paths, state,
addresses) that composes the Ray nodes (ray_nodes.py), the services (mlflow_server.py, s3_endpoint.py,
postgres.py) and the hosts (hosts.py), and keeps only the order in which they start and stop.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

from infra.cluster import environment, processes, startup, teardown
from infra.cluster.layout import HEAD, SERVICES, ClusterError, ClusterLayout, ClusterSettings
from infra.cluster.mlflow_server import MLflowServer
from infra.cluster.postgres import Postgres
from infra.cluster.processes import terminate
from infra.cluster.ray_nodes import RayNodes
from infra.cluster.s3_endpoint import S3Endpoint
from infra.cluster.status import cluster_status


class LocalCluster(ClusterLayout):
    """One local multi-node cluster, described by the state in ``settings.state_dir``."""

    def __init__(self, settings: ClusterSettings | None = None, verbose: bool = False) -> None:
        super().__init__(settings)
        self.verbose = verbose
        self.ray = RayNodes(self)
        self.mlflow = MLflowServer(self)
        self.s3 = S3Endpoint(self)
        self.postgres = Postgres(self)

    def _say(self, message: str) -> None:
        if self.verbose:
            print(f"[local-cluster] {message}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------- environment, processes, queries
    def client_env(self) -> dict[str, str]:
        return environment.client_env(self)

    def subprocess_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return environment.subprocess_env(self, base)

    def _node_env(self, node: str) -> dict[str, str]:
        return environment.node_env(self, node)

    def env_script(self) -> str:
        return environment.env_script(self)

    def processes(self, node: str | None = None) -> list[Any]:
        """Live processes of this cluster, or of one node or service (processes.find)."""
        return processes.find(self.cluster_id, node)

    @staticmethod
    def _terminate(procs: list[Any], sig: int = signal.SIGTERM, grace_s: float = 5.0) -> list[Any]:
        return terminate(procs, sig, grace_s)

    def nodes(self) -> list[dict[str, Any]]:
        return self.ray.nodes()

    def alive_nodes(self) -> list[dict[str, Any]]:
        return self.ray.alive()

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        return self.ray.wait_for(count, timeout_s)

    def wait_for_new_node(self, known: set[str], timeout_s: float = 120.0) -> dict[str, Any]:
        return self.ray.wait_for_new(known, timeout_s)

    def mlflow_healthy(self) -> bool:
        return self.mlflow.healthy()

    def wait_for_mlflow(self, timeout_s: float = 120.0) -> None:
        self.mlflow.wait(timeout_s)

    def s3_healthy(self) -> bool:
        return self.s3.healthy()

    def status(self, note: str = "") -> dict[str, Any]:
        return cluster_status(self, note)

    # ------------------------------------------------------------------ single parts, started again
    def start_node(self, name: str) -> None:
        """Start the head (``name == "head"``) or a worker node (``"worker-K"``); also restarts a killed
        worker with its original settings."""
        self.ray.start([name], self._say)

    def start_nodes(self, names: list[str]) -> None:
        self.ray.start(names, self._say)

    def kill_node(self, name: str, sig: int = signal.SIGKILL, raylet_only: bool = False) -> list[int]:
        return self.ray.kill(name, sig, raylet_only)

    def start_mlflow(self, wait: bool = True) -> None:
        self.mlflow.start(wait)

    def stop_mlflow(self, sig: int = signal.SIGTERM) -> None:
        """Stop only the MLflow server (the tracking-outage fault test)."""
        self.mlflow.stop(sig)

    def restart_mlflow(self) -> None:
        """Stop (SIGTERM, SIGKILL after 5 s) and start the MLflow server; returns once it answers."""
        self.mlflow.stop()
        self.mlflow.start(wait=True)

    def start_s3(self, new_key: bool = False) -> None:
        """Start the S3 endpoint on the head host's address with the objects it keeps on disk; with
        ``new_key`` (``up`` of a stopped cluster) under a new key pair, else under the current one (a restart
        that running jobs survive)."""
        objects = self.s3.start(new_key)
        self._say(f"S3 endpoint on {self.s3_url}, bucket {self.bucket_uri} ({objects} objects)")

    def start_postgres(self) -> None:
        """Start the private PostgreSQL (``initdb`` on first use) on the head host's address."""
        if self.postgres.start():
            self._say(f"PostgreSQL data directory created in {self.postgres_dir}")
        self._say(f"PostgreSQL on {self.host_ip('postgres')}:{self.settings.postgres_port}")

    def restart_node(self, name: str) -> list[str]:
        """Stop whatever is left of node ``name`` (a dead raylet's log monitor, agents, workers), start it
        again with its original settings and wait until it is alive. Returns the leftovers it stopped.

        Raises:
            ClusterError: no such node, the head (its GCS holds the cluster), a leftover survived SIGKILL, or
                the node did not join within ``start_timeout_s``.
        """
        if name not in self.state.get("nodes", {}):
            raise ClusterError(
                f"no node {name!r} in this cluster; nodes: {', '.join(self.state.get('nodes', {}))}"
            )
        if name == HEAD:
            raise ClusterError("the head holds the cluster's GCS: restart the cluster (`down`, then `up`)")
        leftovers = self.processes(name)
        described = [processes.describe(p) for p in leftovers]
        survivors = processes.terminate(leftovers, grace_s=3.0)
        if survivors:
            raise ClusterError(
                f"{name}: processes survived SIGKILL: {[processes.describe(p) for p in survivors]}"
            )
        known = {n["node_id"] for n in self.nodes()}
        self.start_node(name)
        self.wait_for_new_node(known, timeout_s=self.settings.start_timeout_s)
        return described

    def partition(self, host: str) -> None:
        """Cut ``host``'s link (a worker host or "mlflow"; ``--hosts`` only): nothing reaches it or leaves
        it until :meth:`heal`. Its processes keep running, as on a machine behind a failed switch port.

        Raises:
            ClusterError: the cluster has no hosts of its own (not `up --hosts`) or no host ``host``.
        """
        self._set_link(host, up=False)

    def heal(self, host: str) -> None:
        """Reconnect ``host``. Ray does not take back a node its GCS declared dead: that raylet exits when
        it hears so, and `restart-node` (or `up`) starts the node again."""
        self._set_link(host, up=True)

    def _set_link(self, host: str, up: bool) -> None:
        if self.network is None:
            raise ClusterError("partitions need hosts of their own: start the cluster with `up --hosts`")
        if host not in self.state.get("hosts", {}) or host == HEAD:
            hosts = ", ".join(h for h in self.state.get("hosts", {}) if h != HEAD)
            raise ClusterError(f"no host {host!r} to partition; hosts: {hosts}")
        self.network.set_link(host, up)

    def log_files(self, name: str) -> list[Path]:
        """The log files of a node or service: its start log and Ray's newest raylet logs, or the service's
        log.

        Raises:
            ClusterError: no node or service ``name``.
        """
        if name in SERVICES:
            return [self.logs_dir / f"{name}.log"]
        if name not in self.state.get("nodes", {}):
            known = [*self.state.get("nodes", {}), *(s for s in SERVICES if self.state.get(s))]
            raise ClusterError(f"no node or service {name!r}; known: {', '.join(known)}")
        ray_logs = Path(self.state["nodes"][name]["temp_dir"]) / "session_latest" / "logs"
        # A node started again in the same session writes raylet.1.out, raylet.2.out, ...: show the newest.
        newest = [
            max(
                ray_logs.glob(f"raylet*.{kind}"),
                key=lambda p: p.stat().st_mtime,
                default=ray_logs / f"raylet.{kind}",
            )
            for kind in ("out", "err")
        ]
        return [self.logs_dir / f"{name}.start.log", *newest]

    # ------------------------------------------------------------------------------------- up
    def is_up(self) -> bool:
        return bool(self.state) and bool(self.processes())

    def up(self) -> dict[str, Any]:
        """Start head, workers and MLflow; wait until all nodes are alive. Idempotent: if this state dir's
        cluster is already running, restore what died and start nothing else. On failure, stop what was
        started."""
        with self.lock():
            if self.is_up():
                restored = self.restore_missing()
                did = f"restarted {', '.join(restored)}" if restored else "nothing started"
                return self.status(note=f"already up; {did}")
            if self.state:  # stale state of a cluster that died (reboot, kill -9): clear it first
                teardown.cleanup_files(self, keep_logs=True)
                self.settings = self.requested
            return startup.start_all(self)

    def missing_parts(self) -> list[str]:
        """The nodes without a raylet and the services without a process (s3, postgres, mlflow)."""
        missing = [
            n
            for n in self.state.get("nodes", {})
            if not any(processes.name(p) == "raylet" for p in self.processes(n))
        ]
        services = ["s3", "postgres"] if self.settings.team else []
        services += ["mlflow"] if self.settings.mlflow else []
        return missing + [name for name in services if not self.processes(name)]

    def restore_missing(self) -> list[str]:
        """Bring back what died in a running cluster: S3 and PostgreSQL, then the worker nodes one by one
        (each cleaned of its leftovers first), then MLflow. Returns what was restarted.

        Raises:
            ClusterError: the head is down (its GCS holds the cluster: `down`, then `up`).
        """
        missing = self.missing_parts()
        if HEAD in missing:
            raise ClusterError("the head node is down, and with it the cluster's GCS: run `down`, then `up`")
        for name, start in (("s3", self.start_s3), ("postgres", self.start_postgres)):
            if name in missing:
                start()
        for name in missing:
            if name.startswith("worker-"):
                self.restart_node(name)
        if "mlflow" in missing:
            self.start_mlflow(wait=True)
        return missing

    # ----------------------------------------------------------------------------------- down
    def down(self, keep_logs: bool = False, grace_s: float = 3.0, wipe: bool = False) -> dict[str, Any]:
        """Stop every process of this cluster (workers, head, MLflow, and with --team the S3 endpoint and
        PostgreSQL) and remove the state files. The data stay (the bucket's objects, the
        PostgreSQL data directory and node caches are kept) unless ``wipe`` (teardown.py)."""
        return teardown.down(self, keep_logs, grace_s, wipe)
