"""The local cluster's settings, its state folder and the addresses of its hosts.

:class:`ClusterSettings` is everything ``up`` needs (ports are ``base_port`` + fixed offsets);
:class:`ClusterLayout` names every file of the state folder, reads and writes the state file
(``cluster.json``: what runs, written atomically) and answers where each host and service is reachable.
Every other module of the package takes a :class:`ClusterLayout`; this module imports none of them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infra.cluster import credentials as secret_files
from infra.cluster import hosts as hostnet

REPO_ROOT = Path(__file__).resolve().parents[2]
STATE_FILE = "cluster.json"
ENV_FILE = "env.sh"
TOKEN_FILE = "auth_token"
MARKER = "VAE_LOCAL_CLUSTER"
NODE_MARKER = "VAE_LOCAL_CLUSTER_NODE"
HEAD = "head"
SERVICES = ("mlflow", "s3", "postgres")  # processes of the cluster that are not Ray nodes
LOOPBACK = "127.0.0.1"  # where everything listens, unless the cluster's hosts have their own addresses
BUCKET = "vae"  # the team deployment's bucket on the S3 endpoint
REGION = "us-east-1"
ADMIN_USER = "admin"  # MLflow's basic-auth admin account: the operator's (credentials.json) only
PIPELINE_USER = "vae-pipeline"  # the account of jobs, stages and env.sh: no user or permission management
GIB = 1024**3
MIB = 1024**2


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


def port_in_use(port: int) -> bool:
    """Whether anything is bound to ``port`` on any interface (Ray binds some ports to the machine's IP).
    Own code, not a free-port library (portpicker, ...): the cluster's ports are a fixed block from
    ``base_port``, and the question is whether that block is free, not which port is."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As servers do: connections of a stopped server in TIME_WAIT do not block a new listener.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


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
    # Ports: gcs = base, dashboard/job API = base+1, ray client = base+2, MLflow = base+3, S3 = base+4,
    # PostgreSQL = base+5, the dashboard agent of node k (head k=0) = base+10+k.
    base_port: int = dataclasses.field(default_factory=lambda: _env("VAE_CLUSTER_BASE_PORT", 26300, int))
    mlflow: bool = True
    # MLflow 3's GenAI job runner (huey consumers, one per job type): training never submits such jobs, so
    # it is off unless asked for; `benchmarks/cluster_footprint.py` measures what it costs.
    mlflow_jobs: bool = False
    # The team deployment: an S3 endpoint (data, checkpoints, MLflow artifacts), PostgreSQL behind MLflow,
    # MLflow's basic-auth, each node with its own data cache and no shared folder.
    team: bool = dataclasses.field(default_factory=lambda: _env("VAE_CLUSTER_TEAM", "0") in ("1", "true"))
    # HTTPS for the MLflow server with a CA made for this cluster (tls.py); clients verify it.
    tls: bool = dataclasses.field(default_factory=lambda: _env("VAE_CLUSTER_TLS", "0") in ("1", "true"))
    # Hosts of their own (root): each worker node and the MLflow server in a network namespace with its own
    # address on a private bridge, each node with its own HOME, TMPDIR and data cache (hosts.py).
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


class ClusterLayout:
    """One cluster's state folder, its state file and its addresses. ``state`` is the parsed state file
    (empty when no cluster was started there); a running cluster's settings are the ones it was started with,
    whatever was asked for (``requested``)."""

    def __init__(self, settings: ClusterSettings | None = None) -> None:
        self.requested = settings or ClusterSettings()
        self.settings = self.requested
        self.state_dir = self.settings.state_dir
        self.state: dict[str, Any] = {}
        if self.state_path.exists():
            self.state = json.loads(self.state_path.read_text())
            self.settings = ClusterSettings.from_json({**self.state["settings"], "state_dir": self.state_dir})

    # ------------------------------------------------------------------------------ the state folder
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
        """Where `down` of an older version kept a plain copy of the bucket (uploaded on the next start)."""
        return self.state_dir / "s3"

    @property
    def s3_store(self) -> Path:
        """Where the S3 endpoint keeps its objects (written through before each write is acknowledged)."""
        return self.state_dir / "s3-objects"

    @property
    def s3_keys_path(self) -> Path:
        """The S3 endpoint's key pair alone (0600), the only secret that process reads."""
        return self.state_dir / "s3-key.json"

    @property
    def postgres_dir(self) -> Path:
        return self.state_dir / "postgres"

    @property
    def tls_dir(self) -> Path:
        """The CA and the MLflow server's certificate and key (``up --tls``)."""
        return self.state_dir / "tls"

    @property
    def ca_path(self) -> Path | None:
        """The CA clients verify the MLflow server with, or None without ``--tls``."""
        return self.tls_dir / "ca.pem" if self.settings.tls else None

    @property
    def auth_config_path(self) -> Path:
        return self.state_dir / "mlflow_auth.ini"

    def node_cache(self, node: str) -> Path:
        """A node's own data cache (``VAE_DATA_CACHE``) in the team deployment and with ``--hosts``."""
        return self.state_dir / "nodes" / node / "cache"

    def host_dir(self, host: str) -> Path:
        """A worker host's private folder (HOME, TMPDIR, its data cache): nothing else reads it."""
        return self.state_dir / "nodes" / host

    def credentials(self) -> dict[str, str]:
        """The team deployment's generated secrets (credentials.py)."""
        return secret_files.credentials(self.credentials_path)

    @property
    def cluster_id(self) -> str | None:
        return self.state.get("cluster_id")

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def save(self) -> None:
        """Write the state file atomically (temporary file, then rename)."""
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        tmp.replace(self.state_path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the state folder's lock (one `up`/`down` at a time).

        Raises:
            ClusterError: another `up`/`down` holds it.
        """
        import fcntl

        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / ".lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ClusterError(f"another `up`/`down` is running on {self.state_dir}") from None
            yield

    # ----------------------------------------------------------------------------------- addresses
    @property
    def network(self) -> hostnet.HostNetwork | None:
        """The hosts' namespaces and bridge (``--hosts``), else None (every node on 127.0.0.1)."""
        return hostnet.HostNetwork(self.settings.base_port) if self.settings.hosts else None

    def host_ip(self, host: str) -> str:
        """The address of ``host`` ("head", "mlflow", "worker-K"): its own with ``--hosts``, else loopback.
        The S3 endpoint and PostgreSQL live on the head host."""
        network = self.network
        if network is None:
            return LOOPBACK
        return network.address(HEAD if host in ("s3", "postgres") else host)

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
        scheme = "https" if self.settings.tls else "http"
        return f"{scheme}://{self.host_ip('mlflow')}:{self.settings.mlflow_port}"

    @property
    def s3_url(self) -> str | None:
        return f"http://{self.host_ip('s3')}:{self.settings.s3_port}" if self.settings.team else None

    @property
    def bucket_uri(self) -> str | None:
        return f"s3://{BUCKET}" if self.settings.team else None
