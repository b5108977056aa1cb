"""A real multi-node Ray cluster on this one machine, plus an MLflow tracking server, for tests and demos;
with ``--team`` the team deployment: an S3 endpoint, PostgreSQL behind MLflow with basic-auth, node-local
data caches and no shared folder (infra/team_services.py); with ``--hosts`` (root) each worker node and the
MLflow server on a host of its own: a network namespace with its own address (infra/host_network.py).

    python infra/local_cluster.py up [--team] [--hosts] [--workers N --head-cpus C ... --state-dir DIR]
    python infra/local_cluster.py status [--json]
    python infra/local_cluster.py env          # the shell exports; `eval "$(infra/local-cluster.sh env)"`
    python infra/local_cluster.py restart-node worker-K | mlflow stop|start|restart | logs NAME [-n N]
    python infra/local_cluster.py partition NAME | heal NAME     # --hosts: cut / reconnect a host's link
    python infra/local_cluster.py down [--keep-logs] [--wipe]

What it starts, how token authentication is set and how `down` finds exactly its own processes:
infra/README.md, section 2. Python API (used by the tests): ``LocalCluster(ClusterSettings(...))`` with
``up``, ``down``, ``wait_for_nodes``, ``kill_node``, ``start_node``, ``restart_node``, ``stop_mlflow``,
``start_mlflow``, ``partition``, ``heal``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

if str(Path(__file__).resolve().parent) not in sys.path:  # infra/ is a folder of scripts, not a package
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_network as hostnet  # noqa: E402
import team_services as team  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
STATE_FILE = "cluster.json"
ENV_FILE = "env.sh"
TOKEN_FILE = "auth_token"
MARKER = "VAE_LOCAL_CLUSTER"
NODE_MARKER = "VAE_LOCAL_CLUSTER_NODE"
HEAD = "head"
SERVICES = ("mlflow", "s3", "postgres")  # processes of the cluster that are not Ray nodes
GIB = 1024**3
MIB = 1024**2
# Environment variables that would point our processes at another cluster or another token.
_FOREIGN_ENV = (
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_AUTH_MODE",
)
# `import ray.dashboard.optional_deps` decides whether the dashboard (and so the job API) starts at all.
_DASHBOARD_MODULES = ("aiohttp", "aiohttp_cors", "grpc", "opencensus", "prometheus_client")


class ClusterError(RuntimeError):
    """The local cluster could not be started, inspected or stopped; the message says what to do."""


def parse_bytes(value: str | int) -> int:
    """``"4G"``, ``"512MiB"``, ``"1.5g"`` or a plain number of bytes -> bytes."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use bytes or a number with K/M/G/T, e.g. 4G)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * {"": 1, "K": 1024, "M": MIB, "G": GIB, "T": 1024 * GIB}[unit])


def _env(name: str, default: Any, kind: type = str) -> Any:
    raw = os.environ.get(name)
    return default if raw in (None, "") else kind(raw)


@dataclasses.dataclass
class ClusterSettings:
    """Everything `up` needs. Defaults fit a 2-core / 24 GiB machine: Ray accepts more logical CPUs than
    cores, so head 1 CPU + 2 workers x 1 CPU is fine for tests (tasks are tiny)."""

    state_dir: Path = dataclasses.field(
        default_factory=lambda: Path(_env("VAE_CLUSTER_STATE_DIR", str(REPO_ROOT / "tmp" / "local-cluster")))
    )
    num_workers: int = dataclasses.field(default_factory=lambda: _env("VAE_CLUSTER_WORKERS", 2, int))
    head_cpus: float = dataclasses.field(default_factory=lambda: _env("VAE_CLUSTER_HEAD_CPUS", 1.0, float))
    worker_cpus: float = dataclasses.field(
        default_factory=lambda: _env("VAE_CLUSTER_WORKER_CPUS", 1.0, float)
    )
    worker_gpus: float = dataclasses.field(
        default_factory=lambda: _env("VAE_CLUSTER_WORKER_GPUS", 0.0, float)
    )
    head_memory: int = dataclasses.field(
        default_factory=lambda: parse_bytes(_env("VAE_CLUSTER_HEAD_MEMORY", "2G"))
    )
    worker_memory: int = dataclasses.field(
        default_factory=lambda: parse_bytes(_env("VAE_CLUSTER_WORKER_MEMORY", "4G"))
    )
    object_store_memory: int = dataclasses.field(
        default_factory=lambda: parse_bytes(_env("VAE_CLUSTER_OBJECT_STORE_MEMORY", "512M"))
    )
    # Ports: gcs = base, dashboard/job API = base+1, ray client = base+2, MLflow = base+3,
    # the dashboard agent of node k (head k=0) = base+10+k.
    base_port: int = dataclasses.field(default_factory=lambda: _env("VAE_CLUSTER_BASE_PORT", 26300, int))
    mlflow: bool = True
    # MLflow 3's GenAI job runner (huey consumers, one per job type): training never submits such jobs, so
    # it is off unless asked for; `benchmarks/cluster_footprint.py` measures what it costs.
    mlflow_jobs: bool = False
    # The team deployment: an S3 endpoint (data, checkpoints, MLflow artifacts), PostgreSQL behind MLflow,
    # MLflow's basic-auth, each node with its own data cache and no shared folder (infra/team_services.py).
    team: bool = dataclasses.field(default_factory=lambda: _env("VAE_CLUSTER_TEAM", "0") in ("1", "true"))
    # Hosts of their own (root): each worker node and the MLflow server in a network namespace with its own
    # address on a private bridge, each node with its own HOME, TMPDIR and data cache (infra/host_network.py).
    hosts: bool = dataclasses.field(default_factory=lambda: _env("VAE_CLUSTER_HOSTS", "0") in ("1", "true"))
    # Ray's session dirs hold unix sockets (path limit ~107 bytes), so they live under a short /tmp path.
    ray_temp_root: Path | None = dataclasses.field(
        default_factory=lambda: Path(p) if (p := os.environ.get("VAE_CLUSTER_RAY_TMP")) else None
    )
    start_timeout_s: float = 120.0
    # Extra environment for every node process, e.g. {"RAY_health_check_period_ms": "1000"} (RAY_<config>).
    ray_env: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().resolve()
        if self.num_workers < 0 or self.num_workers > 20:
            raise ValueError(f"num_workers: {self.num_workers} (0..20)")
        if self.ray_temp_root is None:
            self.ray_temp_root = Path("/tmp") / f"vaeray-{self.base_port}"
        self.ray_temp_root = Path(self.ray_temp_root)

    @property
    def gcs_port(self) -> int:
        return self.base_port

    @property
    def dashboard_port(self) -> int:
        return self.base_port + 1

    @property
    def client_server_port(self) -> int:
        return self.base_port + 2

    @property
    def mlflow_port(self) -> int:
        return self.base_port + 3

    @property
    def s3_port(self) -> int:
        return self.base_port + 4

    @property
    def postgres_port(self) -> int:
        return self.base_port + 5

    def agent_port(self, index: int) -> int:
        return self.base_port + 10 + index

    def ports(self) -> list[int]:
        ports = [self.gcs_port, self.dashboard_port, self.client_server_port]
        ports += [self.mlflow_port] if self.mlflow else []
        ports += [self.s3_port, self.postgres_port] if self.team else []
        return ports + [self.agent_port(k) for k in range(self.num_workers + 1)]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["state_dir"], data["ray_temp_root"] = str(self.state_dir), str(self.ray_temp_root)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClusterSettings:
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def _bin(name: str) -> str:
    """A console script of the running interpreter's environment (the venv's `ray`), else from PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ClusterError(f"`{name}` not found next to {sys.executable} or on PATH; activate the venv")
    return found


def port_in_use(port: int) -> bool:
    """Whether anything is bound to ``port`` on any interface (Ray binds some ports to the machine's IP)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: connections of a stopped server in TIME_WAIT do not block a new listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


class LocalCluster:
    """One local multi-node cluster, described by the state in ``settings.state_dir``."""

    def __init__(self, settings: ClusterSettings | None = None, verbose: bool = False) -> None:
        self.verbose = verbose
        self.requested = settings or ClusterSettings()
        self.settings = self.requested
        self.state_dir = self.settings.state_dir
        self.state: dict[str, Any] = {}
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
            # Addresses, ports and paths of a running cluster are the ones it was started with.
            self.settings = ClusterSettings.from_json({**self.state["settings"], "state_dir": self.state_dir})

    def _say(self, message: str) -> None:
        if self.verbose:
            print(f"[local-cluster] {message}", file=sys.stderr, flush=True)

    # ----------------------------------------------------------------------------------------- paths
    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    @property
    def env_path(self) -> Path:
        return self.state_dir / ENV_FILE

    @property
    def token_path(self) -> Path:
        return self.state_dir / TOKEN_FILE

    @property
    def shared_storage(self) -> Path:
        return self.state_dir / "shared"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def mlflow_dir(self) -> Path:
        return self.state_dir / "mlflow"

    @property
    def credentials_path(self) -> Path:
        return self.state_dir / "credentials.json"

    @property
    def saved_bucket(self) -> Path:
        """Where `down` keeps the S3 endpoint's objects (moto holds them in memory)."""
        return self.state_dir / "s3"

    @property
    def postgres_dir(self) -> Path:
        return self.state_dir / "postgres"

    @property
    def auth_config_path(self) -> Path:
        return self.state_dir / "mlflow_auth.ini"

    def node_cache(self, node: str) -> Path:
        """A node's own data cache (``VAE_DATA_CACHE``) in the team deployment and with ``--hosts``."""
        return self.state_dir / "nodes" / node / "cache"

    @property
    def s3_url(self) -> str | None:
        return f"http://{self.host_ip('s3')}:{self.settings.s3_port}" if self.settings.team else None

    @property
    def bucket_uri(self) -> str | None:
        return f"s3://{team.BUCKET}" if self.settings.team else None

    def credentials(self) -> dict[str, str]:
        return team.credentials(self.credentials_path)

    @property
    def network(self) -> hostnet.HostNetwork | None:
        """The hosts' namespaces and bridge (``--hosts``), else None (every node on 127.0.0.1)."""
        return hostnet.HostNetwork(self.settings.base_port) if self.settings.hosts else None

    def host_ip(self, host: str) -> str:
        """The address of ``host`` ("head", "mlflow", "worker-K"): its own with ``--hosts``, else loopback.
        The S3 endpoint and PostgreSQL live on the head host."""
        network = self.network
        if network is None:
            return team.LOOPBACK
        return network.address(HEAD if host in ("s3", "postgres") else host)

    def host_dir(self, host: str) -> Path:
        """A worker host's private folder (HOME, TMPDIR, its data cache): nothing else reads it."""
        return self.state_dir / "nodes" / host

    # ------------------------------------------------------------------------------------- addresses
    @property
    def address(self) -> str:
        """The GCS address for ``ray.init(address=...)``, ``ray status`` and ``ray start --address``."""
        return f"{self.host_ip(HEAD)}:{self.settings.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard and job-submission API (``ray job submit --address``)."""
        return f"http://127.0.0.1:{self.settings.dashboard_port}"

    @property
    def mlflow_url(self) -> str | None:
        if not self.settings.mlflow:
            return None
        return f"http://{self.host_ip('mlflow')}:{self.settings.mlflow_port}"

    @property
    def cluster_id(self) -> str | None:
        return self.state.get("cluster_id")

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def client_env(self) -> dict[str, str]:
        """The variables a client (shell, test, DVC stage) needs to use this cluster."""
        env = {
            "RAY_ADDRESS": self.address,
            "RAY_API_SERVER_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.token_path),
        }
        if not self.settings.team:
            env["VAE_SHARED_STORAGE"] = str(self.shared_storage)
        if self.mlflow_url:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_url
        if self.settings.team:
            creds = self.credentials()
            env.update(
                VAE_BUCKET=str(self.bucket_uri),
                AWS_ENDPOINT_URL=str(self.s3_url),
                AWS_DEFAULT_REGION=team.REGION,
                MLFLOW_TRACKING_USERNAME=team.ADMIN_USER,
                MLFLOW_TRACKING_PASSWORD=creds["mlflow_admin_password"],
            )
            if "aws_access_key_id" in creds:  # set when the S3 endpoint starts
                env.update(AWS_ACCESS_KEY_ID=creds["aws_access_key_id"],
                           AWS_SECRET_ACCESS_KEY=creds["aws_secret_access_key"])
        return env

    def subprocess_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: os.environ) with foreign Ray settings removed and this cluster's set."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _FOREIGN_ENV}
        env.update(self.client_env())
        return env

    def _node_env(self, node: str) -> dict[str, str]:
        env = self.subprocess_env()
        for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            env.pop(key)
        # Jobs run `python ...` through a shell on the head: it must be this venv's python.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        env.update(self.settings.ray_env)
        if (self.settings.team or self.settings.hosts) and node not in SERVICES:
            env["VAE_DATA_CACHE"] = str(self.node_cache(node))  # each node its own, nothing shared
        if self.settings.hosts and node not in SERVICES:
            # The hosts share this machine's hostname, which resolves to loopback; torch.distributed must take
            # the host's own interface (a real host's hostname resolves to its address).
            interface = "eth0" if node.startswith("worker-") else self.network.bridge
            env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = interface
        if self.settings.hosts and node.startswith("worker-"):
            for key, sub in (("HOME", "home"), ("TMPDIR", "tmp"), ("XDG_CACHE_HOME", "home/.cache")):
                (self.host_dir(node) / sub).mkdir(parents=True, exist_ok=True)
                env[key] = str(self.host_dir(node) / sub)
        env[MARKER] = str(self.cluster_id)
        env[NODE_MARKER] = f"{self.cluster_id}/{node}"
        return env

    def env_script(self) -> str:
        lines = [f"# Local Ray cluster {self.cluster_id} ({self.state_dir}); `source` this file."]
        lines += [f"export {key}={shlex.quote(value)}" for key, value in self.client_env().items()]
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------------------------------- processes
    def processes(self, node: str | None = None) -> list[Any]:
        """Live (non-zombie) processes of this cluster, or of one of its nodes ("mlflow" is one too): those
        whose environment carries the marker, plus their descendants."""
        import psutil

        if not self.cluster_id:
            return []
        key, wanted = (
            (MARKER, self.cluster_id) if node is None else (NODE_MARKER, f"{self.cluster_id}/{node}")
        )
        exclude = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
        found: dict[int, Any] = {}
        for proc in psutil.process_iter():
            if proc.pid not in exclude and _environ(proc).get(key) == wanted and _alive(proc):
                found[proc.pid] = proc
        for proc in list(found.values()):  # a process that rewrote its environment block still counts
            with contextlib.suppress(psutil.Error):
                found.update(
                    {
                        child.pid: child
                        for child in proc.children(recursive=True)
                        if child.pid not in exclude and _alive(child)
                    }
                )
        return list(found.values())

    @staticmethod
    def _describe(proc: Any) -> str:
        try:
            return f"{proc.pid} {proc.name()}"
        except Exception:  # noqa: BLE001 - it may have exited meanwhile
            return str(proc.pid)

    def _terminate(self, procs: list[Any], sig: int = signal.SIGTERM, grace_s: float = 5.0) -> list[Any]:
        """Send ``sig``; SIGKILL what is left after ``grace_s``. Returns the processes that survived both."""
        import psutil

        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        alive = [p for p in alive if _alive(p)]
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        _, alive = psutil.wait_procs(alive, timeout=5.0)
        return [p for p in alive if _alive(p)]

    # ------------------------------------------------------------------------------------ lifecycle
    def is_up(self) -> bool:
        return bool(self.state) and bool(self.processes())

    def up(self) -> dict[str, Any]:
        """Start head, workers and MLflow; wait until all nodes are alive. Idempotent: if this state dir's
        cluster is already running, report it and start nothing. On failure, stop what was started."""
        with self._lock():
            if self.is_up():
                restored = self.restore_missing()
                did = f"restarted {', '.join(restored)}" if restored else "nothing started"
                note = f"already up; {did}"
                return self.status(note=note)
            if self.state:  # stale state of a cluster that died (reboot, kill -9): clear it first
                self._cleanup_files(keep_logs=True)
                self.settings = self.requested
            return self._start_all()

    def _start_all(self) -> dict[str, Any]:
        s = self.settings
        missing = [m for m in _DASHBOARD_MODULES if importlib.util.find_spec(m) is None]
        if missing:
            raise ClusterError(
                f"Ray's dashboard (the job-submission API) needs ray[default]; missing modules: {missing}. "
                "Install it: pip install 'ray[default]' (same version as ray)."
            )
        if s.hosts and (why := hostnet.available()):
            raise ClusterError(why)
        busy = [port for port in s.ports() if port_in_use(port)]
        if busy:
            raise ClusterError(
                f"ports {busy} are in use; pick other ports with --base-port "
                f"(VAE_CLUSTER_BASE_PORT), now {s.base_port}"
            )
        folders = [self.state_dir, self.logs_dir, self.mlflow_dir, *([] if s.team else [self.shared_storage])]
        for path in folders:
            path.mkdir(parents=True, exist_ok=True)
        self.token_path.unlink(missing_ok=True)
        with os.fdopen(os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            handle.write(secrets.token_hex(32) + "\n")  # readable by this user only, from the first byte
        self.state = {
            "cluster_id": secrets.token_hex(6),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "settings": s.to_json(),
            "nodes": {},
            "mlflow": None,
        }
        self._save()
        try:
            if self.network:
                workers = [f"worker-{k}" for k in range(1, s.num_workers + 1)]
                hosts = [*(["mlflow"] if s.mlflow else []), *workers]
                self.network.create(hosts)
                self.state["hosts"] = {
                    host: {"address": self.host_ip(host), "namespace": self.network.namespace(host),
                           "link": self.network.veth(host) if host != HEAD else self.network.bridge}
                    for host in [HEAD, *hosts]
                }
                self._save()
                self._say(f"hosts on bridge {self.network.bridge}: "
                          + ", ".join(f"{h} {v['address']}" for h, v in self.state["hosts"].items()))
            if s.team:
                self.start_s3()
                self.start_postgres()
            if s.mlflow:
                self.start_mlflow(wait=False)
            self.start_node(HEAD)
            self.start_nodes([f"worker-{k}" for k in range(1, s.num_workers + 1)])
            self.wait_for_nodes(s.num_workers + 1, timeout_s=s.start_timeout_s)
            self._say(f"{s.num_workers + 1} nodes alive")
            if s.mlflow:
                self.wait_for_mlflow(timeout_s=s.start_timeout_s)
                self._say(f"MLflow answers on {self.mlflow_url}")
        except BaseException:
            with contextlib.suppress(Exception):
                self.down(keep_logs=True)
            raise
        team.write_private(self.env_path, self.env_script())  # it holds the token path and, --team, secrets
        return self.status(note="started")

    def missing_parts(self) -> list[str]:
        """The nodes without a raylet and the services without a process (s3, postgres, mlflow)."""
        missing = [n for n in self.state.get("nodes", {}) if not any(
            _name(p) == "raylet" for p in self.processes(n))]
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

    def restart_node(self, name: str) -> list[str]:
        """Stop whatever is left of node ``name`` (a dead raylet's log monitor, agents, workers), start it
        again with its original settings and wait until it is alive. Returns the leftovers it stopped.

        Raises:
            ClusterError: no such node, the head (its GCS holds the cluster), a leftover survived SIGKILL, or
                the node did not join within ``start_timeout_s``.
        """
        if name not in self.state.get("nodes", {}):
            nodes = ", ".join(self.state.get("nodes", {}))
            raise ClusterError(f"no node {name!r} in this cluster; nodes: {nodes}")
        if name == HEAD:
            raise ClusterError("the head holds the cluster's GCS: restart the cluster (`down`, then `up`)")
        leftovers = self.processes(name)
        described = [self._describe(p) for p in leftovers]
        survivors = self._terminate(leftovers, grace_s=3.0)
        if survivors:
            left = [self._describe(p) for p in survivors]
            raise ClusterError(f"{name}: processes survived SIGKILL: {left}")
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

    def restart_mlflow(self) -> None:
        """Stop (SIGTERM, SIGKILL after 5 s) and start the MLflow server; returns once it answers."""
        self.stop_mlflow()
        self.start_mlflow(wait=True)

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
        newest = [max(ray_logs.glob(f"raylet*.{kind}"), key=lambda p: p.stat().st_mtime,
                      default=ray_logs / f"raylet.{kind}") for kind in ("out", "err")]
        return [self.logs_dir / f"{name}.start.log", *newest]

    def start_node(self, name: str) -> None:
        """Start the head (``name == "head"``) or a worker node (``"worker-K"``); also restarts a killed
        worker with its original settings."""
        self.start_nodes([name])

    def start_nodes(self, names: list[str]) -> None:
        """Start several nodes at once (their ``ray start`` commands run in parallel)."""
        launched = [self._launch_node(name) for name in names]
        failures = []
        for name, proc, log, started in launched:
            try:
                rc = proc.wait(timeout=max(1.0, started + self.settings.start_timeout_s - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = -1
            if rc != 0:
                failures.append(f"`ray start` for {name} failed (exit {rc}); {log}:\n{_tail(log)}")
            else:
                self._say(f"{name} started in {time.monotonic() - started:.1f}s")
        if failures:
            raise ClusterError("\n".join(failures))

    def _launch_node(self, name: str) -> tuple[str, subprocess.Popen, Path, float]:
        s = self.settings
        if name != HEAD and not re.fullmatch(r"worker-[1-9][0-9]*", name):
            raise ValueError(f"node name {name!r}: 'head' or 'worker-K'")
        index = 0 if name == HEAD else int(name.split("-")[1])
        if index > 50:
            raise ValueError(f"node name {name!r}: at most worker-50 (ports base+10..base+60)")
        if self.processes(name):
            raise ClusterError(f"node {name} is already running")
        temp_dir = s.ray_temp_root / name
        temp_dir.mkdir(parents=True, exist_ok=True)
        # Single host: no --node-ip-address, Ray 2.60 replaces 127.0.0.1 by the machine's IP anyway (so the
        # GCS listens on all interfaces -- token auth guards it). --hosts: each node its own address. The
        # dashboard (job API) binds to 127.0.0.1 only, on the head.
        network = self.network
        common = [
            *(["--node-ip-address", self.host_ip(name)] if network else []),
            "--temp-dir",
            str(temp_dir),
            "--dashboard-agent-listen-port",
            str(s.agent_port(index)),
            "--object-store-memory",
            str(s.object_store_memory),
            "--disable-usage-stats",
        ]
        if name == HEAD:
            cmd = [
                _bin("ray"),
                "start",
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
                *common,
            ]
        else:
            cmd = [
                _bin("ray"),
                "start",
                "--address",
                self.address,
                "--num-cpus",
                _num(s.worker_cpus),
                "--num-gpus",
                _num(s.worker_gpus),
                "--memory",
                str(s.worker_memory),
                *common,
            ]
        cmd = [*(network.exec_prefix(name) if network else []), *cmd]
        log = self.logs_dir / f"{name}.start.log"
        with open(log, "w") as out:
            # A new session: the daemons `ray start` leaves behind are not in our caller's process group
            # (Ctrl-C in the shell that ran `up` must not take the cluster down).
            proc = subprocess.Popen(
                cmd,
                env=self._node_env(name),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.state_dir,
            )
        self.state["nodes"][name] = {
            "pgid": proc.pid,
            "temp_dir": str(temp_dir),
            "start_log": str(log),
            "command": shlex.join(cmd),
        }
        self._save()
        return name, proc, log, time.monotonic()

    def start_mlflow(self, wait: bool = True) -> None:
        """Start (or restart, after :meth:`stop_mlflow`) the tracking server on its recorded port.

        Raises:
            ClusterError: the cluster runs without MLflow (`up --no-mlflow`), the server is already running,
                or it did not answer within ``start_timeout_s`` (with ``wait``).
        """
        s = self.settings
        if not s.mlflow:
            raise ClusterError("this cluster runs without an MLflow server (`up --no-mlflow`)")
        if self.processes("mlflow"):
            raise ClusterError("the MLflow server is already running")
        artifacts = self.mlflow_dir / "artifacts"
        artifacts.mkdir(parents=True, exist_ok=True)
        env = self._node_env("mlflow")
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "true" if s.mlflow_jobs else "false"
        if s.team:
            creds = self.credentials()
            pg_host = self.host_ip("postgres")
            team.write_auth_config(self.auth_config_path, s.postgres_port, creds, pg_host)
            store = team.mlflow_team_args(s.postgres_port, creds, pg_host)
            env.update(
                MLFLOW_AUTH_CONFIG_PATH=str(self.auth_config_path),
                MLFLOW_FLASK_SERVER_SECRET_KEY=creds["flask_secret_key"],
                MLFLOW_S3_ENDPOINT_URL=str(self.s3_url),  # the server alone talks to the bucket
            )
        else:
            store = ["--backend-store-uri", f"sqlite:///{self.mlflow_dir / 'mlflow.db'}",
                     "--artifacts-destination", str(artifacts)]
        cmd = [
            *(self.network.exec_prefix("mlflow") if self.network else []),
            sys.executable,
            "-m",
            "mlflow",
            "server",
            *store,
            "--host",
            self.host_ip("mlflow"),
            "--port",
            str(s.mlflow_port),
            "--workers",
            "1",
        ]
        log = self.logs_dir / "mlflow.log"
        with open(log, "a") as out:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.mlflow_dir,
            )
        shown = team.redact(cmd, self.credentials()) if s.team else cmd
        self.state["mlflow"] = {
            "pid": proc.pid,
            "url": self.mlflow_url,
            "log": str(log),
            "backend_store_uri": shown[shown.index("--backend-store-uri") + 1],
            "artifacts": shown[shown.index("--artifacts-destination") + 1],
        }
        self._save()
        if wait:
            self.wait_for_mlflow()

    def _start_service(self, name: str, cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
        """Start one of :data:`SERVICES` in its own session, logging to logs/<name>.log; returns its pid."""
        log = self.logs_dir / f"{name}.log"
        with open(log, "a") as out:
            proc = subprocess.Popen(
                cmd,
                env={**self._node_env(name), **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=cwd,
            )
        self.state[name] = {"pid": proc.pid, "log": str(log), "command": shlex.join(
            team.redact(cmd, self.credentials()))}
        self._save()
        return proc.pid

    def start_s3(self) -> None:
        """Start the S3 endpoint (moto's server) on the head host's address and load the objects `down`
        kept."""
        if self.processes("s3"):
            raise ClusterError("the S3 endpoint is already running")
        host = self.host_ip("s3")
        command = team.s3_command(sys.executable, self.settings.s3_port, host)
        self._start_service("s3", command, self.state_dir, team.S3_ENV)
        try:
            team.wait_for_port(self.settings.s3_port, self.settings.start_timeout_s, host)
            creds = team.update_credentials(self.credentials_path, team.provision_s3(str(self.s3_url)))
            restored = team.restore_bucket(str(self.s3_url), creds, self.saved_bucket)
        except team.ServiceError as error:
            log = self.logs_dir / "s3.log"
            raise ClusterError(f"{error}; {log}:\n{_tail(log)}") from None
        self._say(f"S3 endpoint on {self.s3_url}, bucket {self.bucket_uri} ({restored} objects restored)")

    def start_postgres(self) -> None:
        """Start the private PostgreSQL (``initdb`` on first use) on the head host's address."""
        if self.processes("postgres"):
            raise ClusterError("PostgreSQL is already running")
        creds = self.credentials()
        host = self.host_ip("postgres")
        try:
            data_dir = team.postgres_data_dir(self.postgres_dir)
            if team.init_postgres(data_dir, creds["postgres_password"], self.logs_dir / "initdb.log"):
                self._say(f"PostgreSQL data directory created in {self.postgres_dir}")
            if self.network:  # MLflow's server connects from its own host, `up` from the head's address
                for client in (HEAD, "mlflow"):
                    team.allow_postgres_client(data_dir, self.host_ip(client))
            command = team.postgres_command(data_dir, self.settings.postgres_port, host)
            self._start_service("postgres", command, self.state_dir)
            team.wait_for_postgres(self.settings.postgres_port, creds["postgres_password"],
                                   self.settings.start_timeout_s, host)
        except team.ServiceError as error:
            log = self.logs_dir / "postgres.log"
            raise ClusterError(f"{error}; {log}:\n{_tail(log)}") from None
        self._say(f"PostgreSQL on {host}:{self.settings.postgres_port}")

    def s3_healthy(self) -> bool:
        try:
            team.wait_for_s3(str(self.s3_url), self.credentials(), 2.0)
            return True
        except Exception:  # noqa: BLE001
            return False

    def stop_mlflow(self, sig: int = signal.SIGTERM) -> None:
        """Stop only the MLflow server (the tracking-outage fault test)."""
        left = self._terminate(self.processes("mlflow"), sig=sig)
        if left:
            raise ClusterError(f"MLflow processes survived SIGKILL: {[self._describe(p) for p in left]}")

    def kill_node(self, name: str, sig: int = signal.SIGKILL, raylet_only: bool = False) -> list[int]:
        """Kill a node's processes (default: all of them, SIGKILL -- a machine that vanished). With
        ``raylet_only`` only the raylet gets ``sig``; Ray's workers on that node then die with it."""
        procs = self.processes(name)
        if raylet_only:
            procs = [p for p in procs if _name(p) == "raylet"]
        if not procs:
            raise ClusterError(f"node {name} has no running processes")
        for proc in procs:
            with contextlib.suppress(Exception):
                proc.send_signal(sig)
        return [p.pid for p in procs]

    def down(self, keep_logs: bool = False, grace_s: float = 3.0, wipe: bool = False) -> dict[str, Any]:
        """Stop every process of this cluster (workers, head, MLflow, and with --team the S3 endpoint and
        PostgreSQL) and remove the state files. The data stay (the bucket's objects are saved first, the
        PostgreSQL data directory and node caches are kept) unless ``wipe``."""
        if not self.state:
            removed = self.network.remove() if self.network else []  # a failed `up --hosts` leaves links
            gone = f"; removed {len(removed)} leftover namespaces and links" if removed else ""
            if wipe:
                self._wipe()
                return {"stopped": [], "note": f"no cluster running in {self.state_dir}; data wiped{gone}"}
            return {"stopped": [], "note": f"no cluster state in {self.state_dir}; nothing to stop{gone}"}
        kept = []
        if self.settings.team and not wipe and self.processes("s3"):
            try:
                count = team.save_bucket(str(self.s3_url), self.credentials(), self.saved_bucket)
                kept.append(f"{count} S3 objects in {self.saved_bucket}")
            except Exception as error:  # noqa: BLE001 - stop anyway; say what was not kept
                kept.append(f"NOT the S3 objects ({error})")
        if self.settings.team:
            # PostgreSQL's fast shutdown (SIGINT) after its clients: SIGTERM would wait for them.
            self._terminate(self.processes("mlflow"), grace_s=grace_s)
            self._terminate(self.processes("postgres"), sig=signal.SIGINT, grace_s=15.0)
            if not wipe:
                kept.append(f"the PostgreSQL data in {self.postgres_dir}")
        procs = self.processes()
        described = [self._describe(p) for p in procs]
        try:
            # Raylets and the rest first, the GCS last (as `ray stop` does: others complain when it goes
            # first).
            gcs = [p for p in procs if _name(p) == "gcs_server"]
            survivors = self._terminate([p for p in procs if p not in gcs], grace_s=grace_s)
            survivors += self._terminate(gcs, grace_s=2.0)
            # Anything spawned meanwhile (a worker the raylet was starting) goes too.
            survivors += self._terminate(self.processes(), sig=signal.SIGKILL, grace_s=2.0)
            if survivors:
                raise ClusterError(f"processes survived SIGKILL: {[self._describe(p) for p in survivors]}")
        finally:  # the links go whatever happened to the processes
            removed = self.network.remove() if self.network else []
        temp_root = self.settings.ray_temp_root
        if keep_logs and temp_root and temp_root.exists():
            kept.append(f"Ray's logs in {temp_root}")
        self._cleanup_files(keep_logs=keep_logs)
        if wipe:
            self._wipe()
        else:
            for path, what in ((self.mlflow_dir, "the MLflow store"),
                               (self.shared_storage, "the shared folder"),
                               (self.state_dir / "nodes", "the nodes' folders"),
                               (self.logs_dir, "the start logs")):
                if path.exists():
                    kept.append(f"{what} in {path}")
        note = f"stopped {len(described)} processes"
        note += f"; removed the hosts' {len(removed)} namespaces and links" if removed else ""
        note += f"; kept {', '.join(kept)}" if kept else ""
        return {"stopped": described, "note": note + ("; data wiped" if wipe else "")}

    def _wipe(self) -> None:
        """Remove the kept data: saved bucket, PostgreSQL data, node caches, MLflow data, secrets."""
        if self.postgres_dir.is_symlink():
            shutil.rmtree(self.postgres_dir.resolve(), ignore_errors=True)
            self.postgres_dir.unlink()
        for path in (self.saved_bucket, self.postgres_dir, self.state_dir / "nodes", self.mlflow_dir,
                     self.shared_storage):
            shutil.rmtree(path, ignore_errors=True)
        for path in (self.credentials_path, self.auth_config_path):
            path.unlink(missing_ok=True)

    def _cleanup_files(self, keep_logs: bool) -> None:
        temp_root = self.settings.ray_temp_root
        if not keep_logs and temp_root and temp_root.exists():
            shutil.rmtree(temp_root, ignore_errors=True)
        for path in (self.env_path, self.token_path, self.state_path):
            path.unlink(missing_ok=True)
        self.state = {}

    # --------------------------------------------------------------------------------------- queries
    def _api(self, path: str, timeout_s: float = 5.0) -> Any:
        request = urllib.request.Request(
            self.dashboard_url + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read().decode())

    def nodes(self) -> list[dict[str, Any]]:
        """Nodes the cluster knows (state API through the dashboard): node_id, state, is_head_node,
        resources_total, ..."""
        reply = self._api("/api/v0/nodes?limit=1000&detail=true")
        return list(reply["data"]["result"]["result"])

    def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes() if n.get("state") == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """Block until exactly ``count`` nodes are ALIVE (also use it after killing one: count - 1)."""
        deadline, last, error = time.monotonic() + timeout_s, [], None
        while time.monotonic() < deadline:
            try:
                last = self.alive_nodes()
                if len(last) == count:
                    return last
            except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:  # dashboard still starting
                error = exc
            time.sleep(1.0)
        raise ClusterError(
            f"waited {timeout_s:.0f}s for {count} alive nodes, have {len(last)}"
            + (f" (last error: {error})" if error and not last else "")
            + f"; node start logs are in {self.logs_dir}, Ray logs in {self.settings.ray_temp_root}"
        )

    def wait_for_new_node(self, known: set[str], timeout_s: float = 120.0) -> dict[str, Any]:
        """Block until a node whose ID is not in ``known`` is ALIVE (a restarted node registers anew),
        whatever other nodes are dead meanwhile.

        Raises:
            ClusterError: none joined within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, urllib.error.URLError, KeyError, ValueError):
                new = [n for n in self.alive_nodes() if n["node_id"] not in known]
                if new:
                    return new[0]
            time.sleep(1.0)
        raise ClusterError(f"waited {timeout_s:.0f}s for the restarted node to join; its start log is in "
                           f"{self.logs_dir}, Ray logs in {self.settings.ray_temp_root}")

    def mlflow_healthy(self) -> bool:
        if not self.mlflow_url:
            return False
        try:
            with urllib.request.urlopen(self.mlflow_url + "/health", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_for_mlflow(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.mlflow_healthy():
                return
            if not self.processes("mlflow"):
                break
            time.sleep(0.5)
        log = Path(self.state["mlflow"]["log"]) if self.state.get("mlflow") else self.logs_dir / "mlflow.log"
        raise ClusterError(f"MLflow server did not answer on {self.mlflow_url}/health; {log}:\n{_tail(log)}")

    def status(self, note: str = "") -> dict[str, Any]:
        """What runs: nodes (from Ray and from the processes), addresses, MLflow health."""
        if not self.state:
            return {"up": False, "state_dir": str(self.state_dir), "note": note or "not up"}
        by_node = {}
        for name in [*self.state.get("nodes", {}), *(s for s in SERVICES if self.state.get(s))]:
            procs = self.processes(name)
            raylets = [p.pid for p in procs if _name(p) == "raylet"]
            by_node[name] = {"processes": len(procs), "raylet_pid": raylets[0] if raylets else None,
                             "address": self.host_ip(name)}
            if self.network and name in self.state.get("hosts", {}) and name != HEAD:
                by_node[name]["link_up"] = self.network.link_up(name)
        try:
            ray_nodes = [
                {
                    "node_id": n["node_id"],
                    "node_ip": n.get("node_ip"),
                    "head": n.get("is_head_node", False),
                    "state": n["state"],
                    "resources": n.get("resources_total", {}),
                }
                for n in self.nodes()
            ]
            ray_error = None
        except (OSError, urllib.error.URLError, KeyError, ValueError) as exc:
            ray_nodes, ray_error = [], str(exc)
        alive = sum(1 for n in ray_nodes if n["state"] == "ALIVE")
        expected = len(self.state.get("nodes", {}))
        return {
            "up": alive > 0,
            "healthy": alive == expected and (self.mlflow_healthy() or not self.settings.mlflow)
            and all(info.get("link_up", True) for info in by_node.values())
            and (not self.settings.team or bool(self.processes("postgres") and self.s3_healthy())),
            "note": note,
            "cluster_id": self.cluster_id,
            "state_dir": str(self.state_dir),
            "address": self.address,
            "dashboard_url": self.dashboard_url,
            "mlflow_url": self.mlflow_url,
            "mlflow_healthy": self.mlflow_healthy(),
            "shared_storage": None if self.settings.team else str(self.shared_storage),
            "s3_url": self.s3_url,
            "bucket": self.bucket_uri,
            "s3_healthy": self.s3_healthy() if self.settings.team else None,
            "postgres_port": self.settings.postgres_port if self.settings.team else None,
            "postgres_address": f"{self.host_ip('postgres')}:{self.settings.postgres_port}"
            if self.settings.team else None,
            "env_file": str(self.env_path),
            "alive_nodes": alive,
            "expected_nodes": expected,
            "ray_nodes": ray_nodes,
            "ray_error": ray_error,
            "processes": by_node,
            "hosts": self.state.get("hosts"),
        }

    # ---------------------------------------------------------------------------------------- helpers
    def _save(self) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.state_path)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        import fcntl

        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ClusterError(f"another `up`/`down` is running on {self.state_dir}") from None
            yield


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _name(proc: Any) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001
        return "?"


def _environ(proc: Any) -> dict[str, str]:
    """A process's environment. On Linux read /proc directly: a process that set its title (Ray's agents and
    workers, ``ray::IDLE``) zeroes the start of its environment block, and psutil then returns nothing."""
    try:
        raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self/environ").exists():
            return {}  # the process is gone
        try:
            return dict(proc.environ())  # macOS and others
        except Exception:  # noqa: BLE001
            return {}
    except OSError:  # another user's process, or gone meanwhile
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def _alive(proc: Any) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def format_status(status: dict[str, Any]) -> str:
    if not status.get("alive_nodes") and not status.get("cluster_id"):
        return f"Local Ray cluster: not up (state dir {status['state_dir']})."
    lines = [
        f"Local Ray cluster {status['cluster_id']}: {status['alive_nodes']}/{status['expected_nodes']} "
        f"nodes alive{' -- ' + status['note'] if status.get('note') else ''}"
    ]
    for node in sorted(status["ray_nodes"], key=lambda n: (not n["head"], n["state"] != "ALIVE")):
        cpus = node["resources"].get("CPU", 0)
        gpus = node["resources"].get("GPU", 0)
        lines.append(
            f"  {'head  ' if node['head'] else 'worker'} {node['node_id'][:12]}"
            f"  {node.get('node_ip') or '':<13}  {node['state']:<5}"
            f"  CPU {cpus:g}  GPU {gpus:g}  memory {node['resources'].get('memory', 0) / GIB:.1f} GiB"
        )
    if status.get("ray_error"):
        lines.append(f"  (Ray did not answer: {status['ray_error']})")
    lines += [
        f"  Ray address (ray.init, ray status): {status['address']}",
        f"  Dashboard + job API (ray job submit): {status['dashboard_url']}",
        f"  MLflow tracking server: {status['mlflow_url'] or 'not started'}"
        + (
            ""
            if not status["mlflow_url"]
            else ("  (healthy)" if status["mlflow_healthy"] else "  (NOT answering)")
        ),
        *(
            [f"  Shared storage for train.storage_path: {status['shared_storage']}"]
            if status.get("shared_storage")
            else [
                f"  S3 endpoint: {status['s3_url']}, bucket {status['bucket']}"
                + ("  (healthy)" if status.get("s3_healthy") else "  (NOT answering)"),
                f"  PostgreSQL (MLflow's store): {status['postgres_address']}",
            ]
        ),
        *(
            ["  Hosts (own network namespaces): " + ", ".join(
                f"{host} {info['address']}" for host, info in status["hosts"].items())]
            if status.get("hosts") else []
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
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="local-cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where state, logs, MLflow data and shared storage live "
        "(VAE_CLUSTER_STATE_DIR; default <repo>/tmp/local-cluster, git-ignored)",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start head + workers + MLflow server")
    up.add_argument(
        "--workers", type=int, default=None, help="worker nodes besides the head (VAE_CLUSTER_WORKERS, 2)"
    )
    up.add_argument(
        "--head-cpus", type=float, default=None, help="logical CPUs of the head (1; 0 keeps tasks off it)"
    )
    up.add_argument("--worker-cpus", type=float, default=None, help="logical CPUs per worker (1)")
    up.add_argument("--worker-gpus", type=float, default=None, help="logical GPUs per worker (0)")
    up.add_argument("--head-memory", default=None, help="Ray memory resource of the head (2G)")
    up.add_argument("--worker-memory", default=None, help="Ray memory resource per worker (4G)")
    up.add_argument("--object-store-memory", default=None, help="object store per node (512M)")
    up.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="gcs=base, dashboard=base+1, client=base+2, mlflow=base+3, agents=base+10+k (26300)",
    )
    up.add_argument(
        "--ray-temp-root", type=Path, default=None, help="Ray temp dirs (/tmp/vaeray-<base port>)"
    )
    up.add_argument("--no-mlflow", action="store_true", help="do not start the MLflow server")
    up.add_argument(
        "--hosts",
        action="store_true",
        help="root: each worker node and the MLflow server in its own network namespace with its own address "
        "on a private bridge, each node its own HOME/TMPDIR/cache (VAE_CLUSTER_HOSTS=1)",
    )
    up.add_argument("--mlflow-jobs", action="store_true",
                    help="start MLflow's GenAI job runner too (off: training does not use it)")
    up.add_argument(
        "--team",
        action="store_true",
        help="the team deployment: an S3 endpoint for data, checkpoints and artifacts, PostgreSQL behind "
        "MLflow with basic-auth, node-local data caches and no shared folder (VAE_CLUSTER_TEAM=1)",
    )
    up.add_argument(
        "--ray-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the Ray nodes, e.g. RAY_health_check_period_ms=1000 (repeatable)",
    )
    status = sub.add_parser(
        "status", help="nodes, addresses, MLflow health (exit 0 healthy, 1 degraded, 3 not up)"
    )
    status.add_argument("--json", action="store_true")
    sub.add_parser("env", help="print the shell exports for this cluster")
    restart = sub.add_parser("restart-node", help="clean a node's leftovers and start it again")
    restart.add_argument("name", help="worker-K")
    mlflow = sub.add_parser("mlflow", help="stop, start or restart the MLflow server")
    mlflow.add_argument("action", choices=["stop", "start", "restart"])
    for verb, what in (("partition", "cut a host's network link (--hosts)"),
                       ("heal", "reconnect a host (then `restart-node` if Ray declared it dead)")):
        sub.add_parser(verb, help=what).add_argument("name", help="worker-K or mlflow")
    logs = sub.add_parser("logs", help="the last lines of a node's or service's logs")
    logs.add_argument("name", help="head, worker-K, mlflow, s3 or postgres")
    logs.add_argument("-n", "--lines", type=int, default=40)
    down = sub.add_parser("down", help="stop exactly what `up` started")
    down.add_argument("--keep-logs", action="store_true", help="keep Ray's temp dirs (logs)")
    down.add_argument(
        "--wipe", action="store_true", help="also delete the kept data (bucket, PostgreSQL, caches, MLflow)"
    )
    return parser


def settings_from_args(args: argparse.Namespace) -> ClusterSettings:
    overrides: dict[str, Any] = {}
    if args.state_dir is not None:
        overrides["state_dir"] = args.state_dir
    mapping = {
        "workers": "num_workers",
        "head_cpus": "head_cpus",
        "worker_cpus": "worker_cpus",
        "worker_gpus": "worker_gpus",
        "base_port": "base_port",
        "ray_temp_root": "ray_temp_root",
    }
    for arg, field in mapping.items():
        if getattr(args, arg, None) is not None:
            overrides[field] = getattr(args, arg)
    for arg in ("head_memory", "worker_memory", "object_store_memory"):
        if getattr(args, arg, None) is not None:
            overrides[arg] = parse_bytes(getattr(args, arg))
    if getattr(args, "no_mlflow", False):
        overrides["mlflow"] = False
    if getattr(args, "team", False):
        overrides["team"] = True
    if getattr(args, "hosts", False):
        overrides["hosts"] = True
    if getattr(args, "mlflow_jobs", False):
        overrides["mlflow_jobs"] = True
    if getattr(args, "ray_env", None):
        pairs = [item.split("=", 1) for item in args.ray_env]
        if any(len(pair) != 2 or not pair[0] for pair in pairs):
            raise ValueError(f"--ray-env takes KEY=VALUE, got {args.ray_env}")
        overrides["ray_env"] = dict(pairs)
    return ClusterSettings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cluster = LocalCluster(settings_from_args(args), verbose=True)
        if args.command == "up":
            print(format_status(cluster.up()))
            return 0
        if args.command == "down":
            print(cluster.down(keep_logs=args.keep_logs, wipe=args.wipe)["note"])
            return 0
        if args.command in ("restart-node", "mlflow", "logs", "partition", "heal") and not cluster.state:
            print(f"local-cluster: no cluster in {cluster.state_dir}; start one with `up`", file=sys.stderr)
            return 3
        if args.command in ("partition", "heal"):
            getattr(cluster, args.command)(args.name)
            print(f"{args.name}: link {'cut' if args.command == 'partition' else 'up again'}")
            return 0
        if args.command == "restart-node":
            stopped = cluster.restart_node(args.name)
            print(f"{args.name}: stopped {len(stopped)} leftover process(es), started again, alive")
            return 0
        if args.command == "mlflow":
            {"stop": cluster.stop_mlflow, "start": cluster.start_mlflow, "restart": cluster.restart_mlflow}[
                args.action]()
            where = "stopped" if args.action == "stop" else f"answers on {cluster.mlflow_url}"
            print(f"MLflow {args.action}: {where}")
            return 0
        if args.command == "logs":
            for path in cluster.log_files(args.name):
                print(f"==> {path} <==\n{_tail(path, args.lines)}\n")
            return 0
        if args.command == "env":
            if not cluster.state:
                print(f"# no local cluster in {cluster.state_dir}", file=sys.stderr)
                return 3
            sys.stdout.write(cluster.env_script())
            return 0
        status = cluster.status()
        print(json.dumps(status, indent=2) if args.json else format_status(status))
        return 3 if not cluster.state else (0 if status["healthy"] else 1)
    except (ClusterError, team.ServiceError, hostnet.NetworkError, ValueError) as exc:
        print(f"local-cluster: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
