"""infra/local_cluster.py: a real head + 2 worker raylets + MLflow server on this machine.

The module-scoped cluster is started once (about 25 s on 2 cores) and stopped by the fixture even when a test
fails; the last test checks that `down` leaves none of its processes behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from infra.cluster import parse_bytes, port_in_use
from infra.cluster.processes import environ as process_environ
from tests.cluster_helpers import (
    INFRA_DIR,
    ClusterError,
    ClusterSettings,
    LocalCluster,
    cluster_cli,
    free_base_port,
    local_cluster,
    ray_cli,
    submit_job,
    write_params,
)

CLI = [sys.executable, str(INFRA_DIR / "local_cluster.py")]


# ------------------------------------------------------------------------------------ fast, no cluster
def test_parse_bytes():
    parse = parse_bytes
    assert parse("4G") == 4 * 1024**3
    assert parse("512M") == parse("512MiB") == 512 * 1024**2
    assert parse("1.5g") == int(1.5 * 1024**3)
    assert parse(1000) == parse("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse("lots")


def test_settings_ports_and_short_temp_dir(tmp_path):
    settings = ClusterSettings(state_dir=tmp_path, num_workers=3, base_port=27000)
    assert settings.gcs_port == 27000 and settings.dashboard_port == 27001 and settings.mlflow_port == 27003
    assert settings.ports() == [27000, 27001, 27002, 27003, 27010, 27011, 27012, 27013]
    assert len(set(settings.ports())) == len(settings.ports())
    # Ray's unix sockets live below the temp dir: it must stay short whatever the state dir.
    assert len(str(settings.ray_temp_root)) < 30
    # Not Ray's defaults, so a developer's own `ray start` does not collide.
    assert not {6379, 8265, 10001, 52365} & set(ClusterSettings(state_dir=tmp_path).ports())


def test_hosts_mode_gives_every_host_its_own_address_and_private_folders(tmp_path):
    """--hosts: clients reach the head and MLflow on their own addresses (no loopback, no machine IP); two
    clusters on different base ports get different subnets; names fit the kernel's 15-character limit."""
    cluster = LocalCluster(ClusterSettings(state_dir=tmp_path, base_port=27000, hosts=True, num_workers=2))
    cluster.state = {"cluster_id": "abc"}
    network = cluster.network
    subnet = network.subnet
    assert subnet == "10.205.120" and subnet != LocalCluster(ClusterSettings(
        state_dir=tmp_path, base_port=27100, hosts=True)).network.subnet
    assert cluster.address == f"{subnet}.1:27000" and cluster.mlflow_url == f"http://{subnet}.2:27003"
    assert [network.address(h) for h in ("worker-1", "worker-2")] == [f"{subnet}.11", f"{subnet}.12"]
    assert network.exec_prefix("worker-1") == ["ip", "netns", "exec", "vae27000-worker-1"]
    assert network.exec_prefix("head") == []
    names = (network.bridge, network.veth("mlflow"), network.veth("worker-99"))
    assert all(len(name) <= 15 for name in names)
    env = cluster._node_env("worker-2")
    assert env["HOME"].startswith(str(tmp_path / "nodes" / "worker-2"))
    assert env["TMPDIR"].startswith(str(tmp_path / "nodes" / "worker-2"))
    assert env["GLOO_SOCKET_IFNAME"] == "eth0"
    assert cluster._node_env("head")["GLOO_SOCKET_IFNAME"] == "vaebr27000"
    with pytest.raises(ValueError, match="worker-K"):
        network.address("node-1")


def test_hosts_as_root_refuse_a_state_folder_the_accounts_cannot_enter_before_anything_starts(tmp_path):
    """`up --hosts` as root runs every process as an unprivileged account (infra/cluster/accounts.py); under
    a 0700 folder each would fail at its first step with the reason only in its log. `up` refuses at once,
    naming the account, the folder and the way out, before it makes a host or starts a process."""
    from infra.cluster import hosts as hostnet

    if why := hostnet.available():
        pytest.skip(f"--hosts: {why}")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o700)
    port = free_base_port()
    cluster = LocalCluster(ClusterSettings(state_dir=locked / "state", base_port=port, hosts=True,
                                           num_workers=1))
    with pytest.raises(ClusterError, match=r"vae-ray cannot use .* the state folder .*locked/state.* o\+x"):
        cluster.up()
    assert subprocess.run(["ip", "link", "show", cluster.network.bridge], capture_output=True).returncode != 0
    assert not Path(f"/tmp/vaeray-{port}").exists() and not cluster.state_path.exists()


def test_env_script_sets_token_auth_and_addresses(tmp_path):
    cluster = LocalCluster(ClusterSettings(state_dir=tmp_path, base_port=27000))
    cluster.state = {"cluster_id": "abc"}
    script = cluster.env_script()
    assert "export RAY_AUTH_MODE=token" in script
    assert f"export RAY_AUTH_TOKEN_PATH={tmp_path / 'auth_token'}" in script
    assert "export RAY_ADDRESS=127.0.0.1:27000" in script
    assert "export RAY_API_SERVER_ADDRESS=http://127.0.0.1:27001" in script
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:27003" in script
    # A token in the caller's environment would win over the cluster's token file: it is removed.
    env = cluster.subprocess_env({"RAY_AUTH_TOKEN": "other", "RAY_ADDRESS": "10.0.0.1:6379", "HOME": "/h"})
    assert "RAY_AUTH_TOKEN" not in env and env["RAY_ADDRESS"] == "127.0.0.1:27000" and env["HOME"] == "/h"


def test_cli_status_and_down_without_a_cluster(tmp_path):
    status = subprocess.run([*CLI, "--state-dir", str(tmp_path), "status"], capture_output=True, text=True)
    assert status.returncode == 3 and "not up" in status.stdout
    down = subprocess.run([*CLI, "--state-dir", str(tmp_path), "down"], capture_output=True, text=True)
    assert down.returncode == 0 and "nothing to stop" in down.stdout


def test_write_params_applies_and_validates_overrides(tmp_path):
    path = write_params(
        tmp_path / "p.yaml", {"train.epochs": 2, "train.storage_path": str(tmp_path / "runs")}
    )
    written = yaml.safe_load(path.read_text())
    assert written["train"]["epochs"] == 2 and written["train"]["storage_path"] == str(tmp_path / "runs")
    assert written["model"] == yaml.safe_load((INFRA_DIR.parent / "params.yaml").read_text())["model"]
    with pytest.raises(ValueError, match="train.no_such_knob"):
        write_params(tmp_path / "bad.yaml", {"train.no_such_knob": 1})


def test_shell_wrapper_shows_help():
    done = subprocess.run([str(INFRA_DIR / "local-cluster.sh"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "up" in done.stdout and "down" in done.stdout


# ---------------------------------------------------------------------------------- the real cluster
# The GCS declares a silent node dead after period x threshold (defaults: about 15 s); faster for the tests.
FAST_FAILURE_DETECTION = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(
        tmp_path_factory.mktemp("local-cluster"), num_workers=2, ray_env=FAST_FAILURE_DETECTION
    ) as running:
        yield running


PROBE = """
    import json, os, sys, uuid
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init()  # RAY_ADDRESS is set by the job supervisor

    @ray.remote(num_cpus=0)
    def where(tag):
        # Each node writes into the shared storage folder, as checkpoints would.
        shared = os.environ["VAE_SHARED_STORAGE"]
        with open(os.path.join(shared, f"probe-{tag}.txt"), "w") as handle:
            handle.write(ray.get_runtime_context().get_node_id())
        node = ray.get_runtime_context().get_node_id()
        return {"node_id": node, "cwd": os.getcwd(), "python": sys.executable}

    alive = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    results = ray.get([
        where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(index)
        for index, node in enumerate(alive)
    ])

    import mlflow  # MLFLOW_TRACKING_URI comes from the cluster's environment
    mlflow.set_experiment("local-cluster-probe")
    with mlflow.start_run(run_name="probe-" + uuid.uuid4().hex[:6]) as run:
        mlflow.log_metric("nodes", len(results))
        mlflow.log_text("hello from a job", "probe.txt")
    print("PROBE " + json.dumps({"alive": alive, "results": results, "run_id": run.info.run_id}))
"""


@pytest.mark.slow
def test_three_nodes_alive_and_ray_status_works(cluster):
    nodes = cluster.wait_for_nodes(3, timeout_s=60)
    assert sum(bool(node["is_head_node"]) for node in nodes) == 1
    assert all(node["resources_total"].get("CPU") == 1 for node in nodes)
    # `ray status` from a shell with the cluster's env (token auth on): three active nodes. It shows the
    # autoscaler monitor's view, refreshed every few seconds, so it may list fewer nodes for a moment after
    # the GCS (ray.nodes() above) has all three.
    deadline = time.monotonic() + 60
    while True:
        done = ray_cli(cluster, "status")
        assert done.returncode == 0, done.stdout + done.stderr
        active = done.stdout.split("Active:")[1].split("Pending:")[0]
        if active.count("node_") == 3 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert active.count("node_") == 3, done.stdout


@pytest.mark.slow
def test_token_auth_is_enforced(cluster, tmp_path):
    # Without the token (auth mode off, and no ~/.ray/auth_token in this HOME) the cluster refuses.
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="disabled")
    done = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "status", "--address", cluster.address],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert (
        "AuthenticationError" in done.stdout + done.stderr or "token" in (done.stdout + done.stderr).lower()
    )


@pytest.mark.slow
def test_job_runs_on_every_node_and_logs_to_mlflow(cluster, tmp_path):
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "probe.py").write_text(textwrap.dedent(PROBE))
    result = submit_job(cluster, ["python", "probe.py"], working_dir=job_dir, timeout_s=300)
    assert result.returncode == 0, result.output
    probe = json.loads(next(line for line in result.output.splitlines() if line.startswith("PROBE "))[6:])
    # One task ran on each of the three nodes, each in that node's own copy of the working dir.
    assert len(probe["alive"]) == 3
    assert sorted(r["node_id"] for r in probe["results"]) == sorted(probe["alive"])
    assert len({r["cwd"] for r in probe["results"]}) == 3
    # `python` in jobs is the project's interpreter (the cluster put its venv first on PATH).
    assert all(Path(r["python"]).parent == Path(sys.executable).parent for r in probe["results"])
    # All nodes wrote into the one shared storage folder.
    written = sorted(path.read_text() for path in cluster.shared_storage.glob("probe-*.txt"))
    assert written == sorted(probe["alive"])
    # The job's run is on the MLflow server, with its artifact in the server's artifact store.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster.mlflow_url)
    run = client.get_run(probe["run_id"])
    assert run.data.metrics["nodes"] == 3
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["probe.txt"]
    assert list((cluster.mlflow_dir / "artifacts").rglob("probe.txt"))


@pytest.mark.slow
def test_failing_job_exits_nonzero(cluster, tmp_path):
    job_dir = tmp_path / "failing"
    job_dir.mkdir()
    (job_dir / "fail.py").write_text("raise SystemExit('deliberate failure: bad configuration')\n")
    result = submit_job(cluster, ["python", "fail.py"], working_dir=job_dir, timeout_s=300)
    assert result.returncode != 0
    assert "deliberate failure" in result.output


@pytest.mark.slow
def test_mlflow_server_answers(cluster):
    from mlflow.tracking import MlflowClient

    names = [experiment.name for experiment in MlflowClient(cluster.mlflow_url).search_experiments()]
    assert "Default" in names


@pytest.mark.slow
def test_cli_status_env_and_idempotent_up(cluster):
    state = ["--state-dir", str(cluster.state_dir)]
    status = subprocess.run([*CLI, *state, "status", "--json"], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stdout + status.stderr
    report = json.loads(status.stdout)
    assert report["healthy"] and report["alive_nodes"] == 3 and report["mlflow_healthy"]
    assert report["dashboard_url"] == cluster.dashboard_url and report["mlflow_url"] == cluster.mlflow_url
    env = subprocess.run([*CLI, *state, "env"], capture_output=True, text=True, timeout=60)
    assert f"export RAY_ADDRESS={cluster.address}" in env.stdout
    assert cluster.env_path.read_text() == env.stdout
    # A second `up` reports the running cluster and starts nothing.
    raylets = {name: info["raylet_pid"] for name, info in report["processes"].items() if name != "mlflow"}
    again = subprocess.run([*CLI, *state, "up"], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already up" in again.stdout
    after = LocalCluster(ClusterSettings(state_dir=cluster.state_dir)).status()["processes"]
    assert {name: after[name]["raylet_pid"] for name in raylets} == raylets


@pytest.mark.slow
def test_kill_and_restart_a_worker_node(cluster):
    """What the fault-tolerance tests do to a node: SIGKILL its raylet and all, then bring it back."""
    killed = cluster.kill_node("worker-2")
    assert killed
    started = time.monotonic()
    cluster.wait_for_nodes(2, timeout_s=90)
    detected_s = time.monotonic() - started
    assert not cluster.processes("worker-2")
    assert cluster.processes("worker-1") and cluster.processes("head")
    cluster.start_node("worker-2")
    cluster.wait_for_nodes(3, timeout_s=90)
    assert detected_s < 30, f"the GCS took {detected_s:.0f}s to notice the dead node"


@pytest.mark.slow
def test_operator_commands_restart_a_node_bring_back_missing_parts_and_control_mlflow(cluster):
    """`restart-node` after only the raylet died (its log monitor and agents left behind), `up` on a
    partly-dead cluster, `mlflow stop|start|restart`, `logs` - the shell commands an operator types."""
    cluster.kill_node("worker-1", raylet_only=True)
    cluster.wait_for_nodes(2, timeout_s=90)
    leftovers = cluster.processes("worker-1")
    assert leftovers, "a raylet killed alone leaves its node's other processes"
    done = cluster_cli(cluster, "restart-node", "worker-1")
    assert done.returncode == 0, done.stderr
    assert "alive" in done.stdout and not [p for p in leftovers if _running(p.pid)]
    assert len(cluster.alive_nodes()) == 3

    # `up` on a cluster with two dead nodes and a stopped MLflow restores all three.
    cluster.kill_node("worker-1")
    cluster.kill_node("worker-2")
    cluster.stop_mlflow()
    cluster.wait_for_nodes(1, timeout_s=90)
    again = cluster_cli(cluster, "up")
    assert again.returncode == 0, again.stderr
    assert "restarted worker-1, worker-2, mlflow" in again.stdout
    assert len(cluster.alive_nodes()) == 3 and cluster.mlflow_healthy()

    stopped = cluster_cli(cluster, "mlflow", "stop")
    assert stopped.returncode == 0 and not cluster.processes("mlflow") and not cluster.mlflow_healthy()
    assert cluster_cli(cluster, "status").returncode == 1  # degraded
    assert cluster_cli(cluster, "mlflow", "start").returncode == 0 and cluster.mlflow_healthy()
    before = {p.pid for p in cluster.processes("mlflow")}
    assert cluster_cli(cluster, "mlflow", "restart").returncode == 0 and cluster.mlflow_healthy()
    assert not before & {p.pid for p in cluster.processes("mlflow")}

    logs = cluster_cli(cluster, "logs", "worker-2", "-n", "5")
    assert logs.returncode == 0 and "worker-2.start.log" in logs.stdout
    # The restarted raylet's log (raylet.N.out, the session's newest), not the dead one's raylet.out.
    ray_logs = Path(cluster.state["nodes"]["worker-2"]["temp_dir"]) / "session_latest" / "logs"
    newest = max(ray_logs.glob("raylet*.out"), key=lambda path: path.stat().st_mtime)
    assert newest.name != "raylet.out" and f"{newest} <==" in logs.stdout
    assert "mlflow.log" in cluster_cli(cluster, "logs", "mlflow").stdout
    unknown = cluster_cli(cluster, "restart-node", "worker-9")
    assert unknown.returncode == 2 and "no node 'worker-9'" in unknown.stderr


@pytest.mark.slow
def test_down_leaves_nothing_running(cluster):
    cluster_id, temp_root = cluster.cluster_id, str(cluster.settings.ray_temp_root)
    pids = [proc.pid for proc in cluster.processes()]
    assert any(proc.name() == "raylet" for proc in cluster.processes()) and cluster.processes("mlflow")
    note = cluster.down()["note"]
    assert f"kept the MLflow store in {cluster.mlflow_dir}" in note  # what it kept, said
    leftovers = []
    for proc in psutil.process_iter():
        try:
            mine = process_environ(proc).get("VAE_LOCAL_CLUSTER") == cluster_id
            mine = mine or any(temp_root in part for part in proc.cmdline())
            if mine and proc.status() != psutil.STATUS_ZOMBIE:
                leftovers.append(f"{proc.pid} {proc.name()}")
        except psutil.Error:
            continue
    assert not leftovers
    assert not [pid for pid in pids if _running(pid)]
    assert not any(port_in_use(port) for port in cluster.settings.ports())
    assert not cluster.state_path.exists() and not cluster.env_path.exists()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
