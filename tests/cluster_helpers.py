"""Helpers for tests on a real local multi-node Ray cluster (``infra/local_cluster.py``).

Used by tests/test_local_cluster.py and the fault-tolerance tests::

    from cluster_helpers import local_cluster, submit_job

    @pytest.fixture(scope="module")
    def cluster(tmp_path_factory):
        with local_cluster(tmp_path_factory.mktemp("cluster"), num_workers=2) as cluster:
            yield cluster          # stopped (every process of it) even when a test fails

    def test_something(cluster, tmp_path):
        result = submit_job(cluster, ["python", "-m", "pipeline.train", "--params", str(params)],
                            working_dir=REPO_ROOT)
        assert result.returncode == 0, result.output
        cluster.kill_node("worker-1")            # SIGKILL the node's raylet and everything on it
        cluster.wait_for_nodes(2)                # the GCS noticed
        cluster.start_node("worker-1")           # it comes back

Every cluster gets free ports, a short Ray temp dir under /tmp and its own auth token, so tests never meet a
developer's own Ray (or each other's clusters). Jobs are submitted with the ``ray job submit`` CLI in a
subprocess -- exactly what a user runs -- so the test process itself never imports or initialises Ray.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from infra.cluster import ClusterError, ClusterSettings, LocalCluster, port_in_use  # noqa: F401 - re-exported
from infra.cluster import processes as cluster_processes  # noqa: F401 - re-exported

REPO_ROOT = Path(__file__).resolve().parent.parent
INFRA_DIR = REPO_ROOT / "infra"
TERMINAL_JOB_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


def _load_infra_module(name: str):
    """Load the script infra/<name>.py by path (once), as its users run it."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, INFRA_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses needs the module registered
    spec.loader.exec_module(module)
    return module




@contextlib.contextmanager
def reachable_folder(name: str) -> Iterator[Path]:
    """A new folder for a ``--hosts`` cluster's state: under /tmp with an unpredictable name, mode 0711, so
    that the accounts its processes run as (infra/cluster/accounts.py) can enter it, which they cannot under
    pytest's own 0700 temp root. Removed afterwards; kept (and named on stderr) when the body raised."""
    folder = Path(tempfile.mkdtemp(prefix=f"vae-{name}-", dir="/tmp"))
    folder.chmod(0o711)
    try:
        yield folder
    except BaseException:
        print(f"kept for a post-mortem: {folder}", file=sys.stderr)
        raise
    shutil.rmtree(folder, ignore_errors=True)


def free_base_port(span: int = 70, attempts: int = 200) -> int:
    """A base port whose whole block ``base .. base+span`` is free (below Linux's ephemeral range)."""
    for _ in range(attempts):
        base = random.randrange(20000, 32000 - span)
        if not any(port_in_use(port) for port in range(base, base + span)):
            return base
    raise RuntimeError("no free block of ports found for a local cluster")


@contextlib.contextmanager
def local_cluster(state_dir: Path, num_workers: int = 2, keep_logs_on_error: bool = True,
                  **settings: Any) -> Iterator[Any]:
    """Start a local cluster (head + ``num_workers`` workers + MLflow unless ``mlflow=False``), yield the
    :class:`LocalCluster`, and stop all of its processes afterwards -- also when the body raised, and also
    when ``up`` itself failed half-way. Other ``settings`` go to :class:`ClusterSettings`
    (``head_cpus``, ``worker_cpus``, ``worker_memory``, ``ray_env``, ...).

    On an error the Ray logs are copied to ``state_dir/ray-logs`` before the temp dirs are removed."""
    settings.setdefault("base_port", free_base_port())
    own_temp_root = "ray_temp_root" not in settings
    if own_temp_root:
        settings["ray_temp_root"] = Path(tempfile.mkdtemp(prefix="vaeray-", dir="/tmp"))
    cluster = LocalCluster(ClusterSettings(state_dir=Path(state_dir), num_workers=num_workers, **settings))
    failed = False
    try:
        cluster.up()
        yield cluster
    except BaseException:
        failed = True
        raise
    finally:
        try:
            if failed and keep_logs_on_error:
                copy_ray_logs(cluster, Path(state_dir) / "ray-logs")
            cluster.down()
        finally:
            if own_temp_root:
                shutil.rmtree(settings["ray_temp_root"], ignore_errors=True)


def copy_ray_logs(cluster: Any, destination: Path) -> Path:
    """Copy each node's Ray logs (``session_latest/logs``) to ``destination/<node>`` for a post-mortem."""
    for node, info in cluster.state.get("nodes", {}).items():
        logs = Path(info["temp_dir"]) / "session_latest" / "logs"
        if logs.is_dir():
            shutil.copytree(logs, destination / node, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("*.sock", "events", "export_events"))
    return destination


@dataclasses.dataclass
class JobResult:
    returncode: int
    output: str
    submission_id: str | None
    seconds: float


def cluster_cli(cluster: Any, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """Run ``infra/local_cluster.py ARGS`` on ``cluster``'s state folder, as an operator types it."""
    return subprocess.run([sys.executable, str(INFRA_DIR / "local_cluster.py"), "--state-dir",
                           str(cluster.state_dir), *args], capture_output=True, text=True, timeout=timeout_s)


def ray_cli(cluster: Any, *args: str, timeout_s: float = 120, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``ray ARGS`` as a user in a shell that sourced the cluster's env.sh would."""
    ray = str(Path(sys.executable).parent / "ray")
    return subprocess.run([ray, *args], env=cluster.subprocess_env(env), cwd=cwd, capture_output=True,
                          text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)


def submit_job(cluster: Any, entrypoint: Sequence[str] | str, working_dir: Path | None = None,
               timeout_s: float = 600, runtime_env: dict[str, Any] | None = None,
               submission_id: str | None = None, no_wait: bool = False,
               entrypoint_num_cpus: float | None = None) -> JobResult:
    """``ray job submit [--working-dir D] -- ENTRYPOINT``; waits for the job unless ``no_wait``.

    ``returncode`` is the CLI's: 0 when the job SUCCEEDED, non-zero when it failed or was stopped. On
    ``timeout_s`` the job is stopped and ``subprocess.TimeoutExpired`` raised."""
    args = ["job", "submit"]
    if working_dir is not None:
        args += ["--working-dir", str(working_dir)]
    if runtime_env:
        args += ["--runtime-env-json", json.dumps(runtime_env)]
    if submission_id:
        args += ["--submission-id", submission_id]
    if no_wait:
        args += ["--no-wait"]
    if entrypoint_num_cpus is not None:
        args += ["--entrypoint-num-cpus", str(entrypoint_num_cpus)]
    args += ["--", *([entrypoint] if isinstance(entrypoint, str) else entrypoint)]
    started = time.monotonic()
    try:
        done = ray_cli(cluster, *args, timeout_s=timeout_s, cwd=working_dir)
    except subprocess.TimeoutExpired:
        if submission_id:
            with contextlib.suppress(Exception):
                stop_job(cluster, submission_id)
        raise
    output = done.stdout + done.stderr
    found = re.search(r"Job '([^']+)' submitted successfully", output)
    return JobResult(done.returncode, output, found.group(1) if found else submission_id,
                     time.monotonic() - started)


def _dashboard_api(cluster: Any, path: str, method: str = "GET", timeout_s: float = 10) -> Any:
    """Ray's dashboard REST API (jobs ``/api/jobs/...``, state ``/api/v0/...``) with the cluster's bearer
    token."""
    request = urllib.request.Request(cluster.dashboard_url + path, method=method,
                                     headers={"Authorization": f"Bearer {cluster.token}"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read().decode() or "null")


def job_info(cluster: Any, submission_id: str) -> dict[str, Any]:
    """status (PENDING/RUNNING/SUCCEEDED/FAILED/STOPPED), message, driver_exit_code, ..."""
    return _dashboard_api(cluster, f"/api/jobs/{submission_id}")


def job_logs(cluster: Any, submission_id: str) -> str:
    return _dashboard_api(cluster, f"/api/jobs/{submission_id}/logs")["logs"]


def job_actors(cluster: Any, submission_id: str, class_name: str,
               state: str = "ALIVE") -> list[dict[str, Any]]:
    """The actors of class ``class_name`` that job ``submission_id`` created and that are in ``state``, from
    Ray's state API (what ``ray list actors --detail`` shows): each a dict with ``pid``, ``node_id``,
    ``actor_id``, ... E.g. a training job's Ray Train workers: ``job_actors(cluster, job, "RayTrainWorker")``.

    Placement comes from Ray itself, not from log lines: only rank 0 prints, so a worker's pid in the logs
    says nothing about the other ranks."""
    job_id = job_info(cluster, submission_id).get("job_id")
    query = urllib.parse.urlencode({"limit": 10000, "detail": "true", "filter_keys": "class_name",
                                    "filter_predicates": "=", "filter_values": class_name})
    reply = _dashboard_api(cluster, f"/api/v0/actors?{query}")
    return [actor for actor in reply["data"]["result"]["result"]
            if actor.get("state") == state and job_id is not None and actor.get("job_id") == job_id]


def job_tasks(cluster: Any, submission_id: str, name: str) -> list[dict[str, Any]]:
    """The tasks named ``name`` (e.g. a Ray Data operator, ``MapBatches(_decode_batch)``) that job
    ``submission_id`` ran, from Ray's state API (``ray list tasks --detail``): each a dict with ``node_id``,
    ``state``, ... Placement from Ray itself, as :func:`job_actors`."""
    job_id = job_info(cluster, submission_id).get("job_id")
    query = urllib.parse.urlencode({"limit": 10000, "detail": "true", "filter_keys": "name",
                                    "filter_predicates": "=", "filter_values": name})
    reply = _dashboard_api(cluster, f"/api/v0/tasks?{query}")
    return [task for task in reply["data"]["result"]["result"]
            if job_id is not None and task.get("job_id") == job_id]


def stop_job(cluster: Any, submission_id: str) -> bool:
    """Ask Ray to stop the job (SIGTERM to the driver, later SIGKILL); True if it was running."""
    return bool(_dashboard_api(cluster, f"/api/jobs/{submission_id}/stop", method="POST").get("stopped"))


def wait_for_job(cluster: Any, submission_id: str, timeout_s: float = 600,
                 statuses: frozenset[str] | set[str] = TERMINAL_JOB_STATUSES) -> dict[str, Any]:
    """Poll until the job's status is one of ``statuses`` (default: finished); returns its info."""
    deadline, info = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        info = job_info(cluster, submission_id)
        if info.get("status") in statuses:
            return info
        time.sleep(1.0)
    raise TimeoutError(f"job {submission_id} still {info.get('status')} after {timeout_s:.0f}s")


def write_params(path: Path, overrides: dict[str, Any], base: Path = REPO_ROOT / "params.yaml") -> Path:
    """Write a validated params file: ``base`` with dotted ``overrides`` applied (infra/cluster_params.py),
    e.g. ``{"train.storage_path": str(cluster.shared_storage / "runs"), "train.epochs": 2}``."""
    cluster_params = _load_infra_module("cluster_params")
    tree = cluster_params.build(Path(base), [], [])
    for dotted, value in overrides.items():
        cluster_params.set_dotted(tree, dotted, value)
    cluster_params.validate(tree, str(path))
    path = Path(path)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path
