"""The cluster's Ray nodes: the head ("head": GCS, dashboard and job API) and worker nodes ("worker-K"),
each started with ``ray start`` (in its host's namespace with ``--hosts``), and what Ray's state API says of
them (through the dashboard, with the cluster token). Its waits are plain loops, not tenacity as the
services' are: they wait for an answer to reach a count and report the last answer when it does not, which a
retry policy (built to retry failures) says less directly."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import shlex
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from infra.cluster import accounts, processes
from infra.cluster.environment import node_env
from infra.cluster.layout import HEAD, ClusterError, ClusterLayout

# `import ray.dashboard.optional_deps` decides whether the dashboard (and so the job API) starts at all.
DASHBOARD_MODULES = ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "prometheus_client")
_API_ERRORS = (OSError, urllib.error.URLError, KeyError, ValueError)  # the dashboard is still starting


def missing_dashboard_modules() -> str | None:
    """None when Ray's dashboard can start here, else the error message (what to install)."""
    missing = [m for m in DASHBOARD_MODULES if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    return (
        f"Ray's dashboard (the job-submission API) needs ray[default]; missing modules: {missing}. "
        "Install it: pip install 'ray[default]' (same version as ray)."
    )


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def node_index(name: str) -> int:
    """0 for the head, K for "worker-K".

    Raises:
        ValueError: another name, or K over 50 (the agents' ports are base+10..base+60).
    """
    if name != HEAD and not re.fullmatch(r"worker-[1-9][0-9]*", name):
        raise ValueError(f"node name {name!r}: 'head' or 'worker-K'")
    index = 0 if name == HEAD else int(name.split("-")[1])
    if index > 50:
        raise ValueError(f"node name {name!r}: at most worker-50 (ports base+10..base+60)")
    return index


class RayNodes:
    """Start, kill and query the Ray nodes of one cluster."""

    def __init__(self, layout: ClusterLayout) -> None:
        self.layout = layout

    def command(self, name: str, temp_dir: Path) -> list[str]:
        """The ``ray start`` command of node ``name``. Single host: no --node-ip-address (Ray 2.60 replaces
        127.0.0.1 by the machine's IP anyway, so the GCS listens on all interfaces - token auth guards it).
        --hosts: each node its own address. The dashboard (job API) binds to 127.0.0.1 only, on the head."""
        layout, s = self.layout, self.layout.settings
        network = layout.network
        common = [
            *(["--node-ip-address", layout.host_ip(name)] if network else []),
            "--temp-dir",
            str(temp_dir),
            "--dashboard-agent-listen-port",
            str(s.agent_port(node_index(name))),
            "--object-store-memory",
            str(s.object_store_memory),
            "--disable-usage-stats",
        ]
        if name == HEAD:
            role = [
                "--head",
                "--port",
                str(s.gcs_port),
                "--dashboard-host",
                "127.0.0.1",
                "--dashboard-port",
                str(s.dashboard_port),
                "--include-dashboard",
                "true",
                "--ray-client-server-port",
                str(s.client_server_port),
                "--num-cpus",
                _num(s.head_cpus),
                "--num-gpus",
                "0",
                "--memory",
                str(s.head_memory),
            ]
        else:
            role = [
                "--address",
                layout.address,
                "--num-cpus",
                _num(s.worker_cpus),
                "--num-gpus",
                _num(s.worker_gpus),
                "--memory",
                str(s.worker_memory),
            ]
        ray = [processes.console_script("ray"), "start", *role, *common]
        return [*(network.exec_prefix(name) if network else []), *accounts.run_as(layout, name), *ray]

    def launch(self, name: str) -> tuple[str, subprocess.Popen, Path, float]:
        """Run ``ray start`` for node ``name`` without waiting; record it in the state file.

        Raises:
            ValueError: not a node name. ClusterError: the node is already running.
        """
        layout = self.layout
        node_index(name)
        if processes.find(layout.cluster_id, name):
            raise ClusterError(f"node {name} is already running")
        owner = accounts.for_process(layout, name)
        temp_dir = processes.private_folder(layout.settings.ray_temp_root, owner) / name
        temp_dir.mkdir(exist_ok=True)
        if owner:
            owner.give(temp_dir)
        cmd = self.command(name, temp_dir)
        log = layout.logs_dir / f"{name}.start.log"
        proc = processes.spawn(cmd, node_env(layout, name), log, layout.state_dir, append=False)
        layout.state["nodes"][name] = {
            "pgid": proc.pid,
            "temp_dir": str(temp_dir),
            "start_log": str(log),
            "command": shlex.join(cmd),
        }
        layout.save()
        return name, proc, log, time.monotonic()

    def start(self, names: list[str], say=lambda message: None) -> None:
        """Start several nodes at once (their ``ray start`` commands run in parallel).

        Raises:
            ClusterError: a ``ray start`` failed or outlasted ``start_timeout_s`` (with its log's tail).
        """
        launched = [self.launch(name) for name in names]
        failures = []
        for name, proc, log, started in launched:
            try:
                rc = proc.wait(
                    timeout=max(1.0, started + self.layout.settings.start_timeout_s - time.monotonic())
                )
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = -1
            if rc != 0:
                failures.append(f"`ray start` for {name} failed (exit {rc}); {log}:\n{processes.tail(log)}")
            else:
                say(f"{name} started in {time.monotonic() - started:.1f}s")
        if failures:
            raise ClusterError("\n".join(failures))

    def kill(self, name: str, sig: int = signal.SIGKILL, raylet_only: bool = False) -> list[int]:
        """Kill a node's processes (default: all of them, SIGKILL - a machine that vanished). With
        ``raylet_only`` only the raylet gets ``sig``; Ray's workers on that node then die with it.

        Raises:
            ClusterError: the node has no running processes.
        """
        procs = processes.find(self.layout.cluster_id, name)
        if raylet_only:
            procs = [p for p in procs if processes.name(p) == "raylet"]
        if not procs:
            raise ClusterError(f"node {name} has no running processes")
        processes.signal_all(procs, sig)
        return [p.pid for p in procs]

    def api(self, path: str, timeout_s: float = 5.0) -> Any:
        """GET ``path`` of the dashboard's HTTP API with the cluster token; the parsed JSON."""
        request = urllib.request.Request(
            self.layout.dashboard_url + path, headers={"Authorization": f"Bearer {self.layout.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read().decode())

    def nodes(self) -> list[dict[str, Any]]:
        """Nodes the cluster knows (state API through the dashboard): node_id, state, is_head_node,
        resources_total, ..."""
        reply = self.api("/api/v0/nodes?limit=1000&detail=true")
        return list(reply["data"]["result"]["result"])

    def alive(self) -> list[dict[str, Any]]:
        """The ALIVE ones of :meth:`nodes`."""
        return [n for n in self.nodes() if n.get("state") == "ALIVE"]

    def wait_for(self, count: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Block until exactly ``count`` nodes are ALIVE (also use it after killing one: count - 1).

        Raises:
            ClusterError: not within ``timeout_s``.
        """
        deadline, last, error = time.monotonic() + timeout_s, [], None
        while time.monotonic() < deadline:
            try:
                last = self.alive()
                if len(last) == count:
                    return last
            except _API_ERRORS as exc:
                error = exc
            time.sleep(1.0)
        raise ClusterError(
            f"waited {timeout_s:.0f}s for {count} alive nodes, have {len(last)}"
            + (f" (last error: {error})" if error and not last else "")
            + f"; node start logs are in {self.layout.logs_dir}, "
            f"Ray logs in {self.layout.settings.ray_temp_root}"
        )

    def wait_for_new(self, known: set[str], timeout_s: float = 120.0) -> dict[str, Any]:
        """Block until a node whose ID is not in ``known`` is ALIVE (a restarted node registers anew),
        whatever other nodes are dead meanwhile.

        Raises:
            ClusterError: none joined within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(*_API_ERRORS):
                new = [n for n in self.alive() if n["node_id"] not in known]
                if new:
                    return new[0]
            time.sleep(1.0)
        raise ClusterError(
            f"waited {timeout_s:.0f}s for the restarted node to join; its start log is in "
            f"{self.layout.logs_dir}, Ray logs in {self.layout.settings.ray_temp_root}"
        )
