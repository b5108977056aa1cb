"""Network-partition drills on a cluster of real hosts on this machine (``local-cluster up --hosts``, root):
a head, three worker hosts and an MLflow host, each in its own network namespace with its own address on a
private bridge. A partition sets a host's link down: its processes keep running but nothing reaches them.

Each drill trains with 2 Train workers (the head has no CPUs, so they run on worker hosts) and reports, on
stdout (`pytest -s`) and in the returned figures: steps trained twice, seconds from the cut to the resumed
run, and MLflow completeness (one value per epoch, every logged step once). The last results are recorded in
infra/README.md ("Partition drills"); run them with

    .venv/bin/python -m pytest -s -m slow tests/test_partition_drills.py
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import mlflow
import pytest

from infra.cluster import accounts
from infra.cluster import hosts as hostnet
from infra.cluster.processes import environ as process_environ
from tests.cluster_helpers import cluster_cli, job_logs, local_cluster, reachable_folder
from tests.fixtures.arrays import write_square_arrays
from tests.test_fault_tolerance import (
    BATCH,
    STEPS_PER_EPOCH,
    TEST,
    TRAIN,
    VALID,
    epochs_logged,
    finished_ok,
    job_params,
    start_training,
    steps_logged,
    wait_for_log,
)

why_not = hostnet.available()
pytestmark = [
    pytest.mark.slow,
    # Namespaces need root; without it the single-host fault tests (test_fault_tolerance.py) still run.
    pytest.mark.skipif(why_not is not None, reason=f"partition drills: {why_not}"),
]

EPOCHS = 4
# Ray's defaults take about a minute to declare a silent node dead (health checks every 3 s, 10 s timeout,
# 5 misses); the drills use 1 s checks with a 1 s timeout: a cut host is declared dead after about 10 s.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "5",
}
assert BATCH == 32 and TRAIN // BATCH == STEPS_PER_EPOCH  # 2 workers x 16 images a step


@pytest.fixture(scope="module")
def hosts():
    with reachable_folder("hosts-cluster") as state, local_cluster(
            state, num_workers=3, hosts=True, head_cpus=0, ray_env=FAST_HEALTH_CHECKS) as running:
        yield running


@pytest.fixture(scope="module")
def workspace(hosts):
    root = Path(hosts.shared_storage) / "workspace"
    write_square_arrays(
        root / "data" / "processed" / "fashion_mnist", {"train": TRAIN, "valid": VALID, "test": TEST}, 220
    )
    if owner := accounts.for_process(hosts, "head"):
        owner.give(root, recursive=True)  # the jobs write runs/ and reports/ next to the data
    return root


def placement(cluster, job: str) -> dict[int, str]:
    """rank -> host name, from rank 0's first line ("rank 0 on 10.x.y.11 (node rank 0), ...")."""
    line = wait_for_log(cluster, job, r"\[train\] \d+ worker\(s\): ([^\n]*)").group(1)
    by_ip = {info["address"]: host for host, info in cluster.state["hosts"].items()}
    return {int(rank): by_ip[ip] for rank, ip in re.findall(r"rank (\d+) on ([0-9.]+)", line)}


def node_state(cluster, host: str) -> str | None:
    """The newest Ray node record of ``host``'s address: ALIVE or DEAD."""
    address = cluster.host_ip(host)
    records = [n for n in cluster.nodes() if n.get("node_ip") == address]
    alive = [n for n in records if n["state"] == "ALIVE"]
    return "ALIVE" if alive else (records[-1]["state"] if records else None)


def mlflow_completeness(cluster, logs: str) -> dict[str, object]:
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", logs).group(1)
    client = mlflow.MlflowClient(cluster.mlflow_url)
    epochs = [m.step for m in client.get_metric_history(run_id, "val_negative_elbo")]
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    return {
        "epoch_values": epochs,
        "duplicate_steps": len(steps) - len(set(steps)),
        "missing_steps": sorted(set(range(1, EPOCHS * STEPS_PER_EPOCH + 1)) - set(steps)),
        "status": client.get_run(run_id).info.status,
    }


def assert_complete(report: dict[str, object]) -> None:
    assert report["epoch_values"] == [STEPS_PER_EPOCH * e for e in range(1, EPOCHS + 1)], report
    assert report["duplicate_steps"] == 0 and report["missing_steps"] == [], report
    assert report["status"] == "FINISHED", report


def cut_a_training_host_and_recover(hosts, workspace, name: str, rank: int) -> dict[str, object]:
    """Train; in epoch 2 cut the host of Train rank ``rank`` until Ray declares it dead; heal; the run must
    finish from its last checkpoint on the other hosts; `restart-node` brings the host back."""
    params = job_params(hosts, workspace, name, **{"train.epochs": EPOCHS})
    job = start_training(hosts, workspace, params, f"drill-{name}")
    victim = placement(hosts, job)[rank]
    wait_for_log(hosts, job, rf"\[train\]   step {STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2}/")
    cut_at = time.monotonic()
    hosts.partition(victim)
    try:
        while node_state(hosts, victim) != "DEAD":
            assert time.monotonic() - cut_at < 120, f"Ray did not declare {victim} dead in 120 s"
            time.sleep(0.5)
        dead_after = time.monotonic() - cut_at
        resumed = wait_for_log(hosts, job, r"resumed from the checkpoint of epoch (\d+) \(step (\d+)\)")
        recovered_after = time.monotonic() - cut_at
    finally:
        hosts.heal(victim)
    logs = finished_ok(hosts, job)
    steps = steps_logged(logs)
    # Steps trained again: from the checkpoint to the last step trained before the cut. That is at least the
    # last step the driver saw before the resumption and at least the checkpoint's own step (step lines that
    # rank 0 printed on a cut host never arrive, so the driver may not have seen the steps of the checkpoint
    # it resumes from); for a cut rank 0 it is a lower bound.
    last_seen = max(steps_logged(logs[: logs.index(resumed.group(0))]) + [int(resumed.group(2))])
    restarted = cluster_cli(hosts, "restart-node", victim)
    assert restarted.returncode == 0, restarted.stderr
    report = {
        "host": victim,
        "rank": rank,
        "dead_after_s": round(dead_after, 1),
        "resumed_after_s": round(recovered_after, 1),
        "resumed_from_epoch": int(resumed.group(1)),
        "steps_redone": last_seen - int(resumed.group(2)),
        "steps_logged_twice": len(steps) - len(set(steps)),
        **mlflow_completeness(hosts, logs),
    }
    print(f"\n[drill] cut the host of rank {rank} ({victim}) in epoch 2: {report}")
    # The newest checkpoint, not a restart from scratch: that of epoch 1, or of epoch 2 when the cut landed
    # after it (a cut rank 0's step lines arrive late, so the driver may see step 60 when epoch 2 is done).
    assert report["resumed_from_epoch"] in (1, 2)
    assert 0 <= report["steps_redone"] <= STEPS_PER_EPOCH
    assert sorted(set(epochs_logged(logs))) == list(range(1, EPOCHS + 1))
    assert_complete(report)
    assert node_state(hosts, victim) == "ALIVE"
    return report


def test_hosts_have_their_own_addresses_and_a_run_spans_them(hosts, workspace):
    nodes = [n for n in hosts.nodes() if n["state"] == "ALIVE"]
    addresses = {n["node_ip"] for n in nodes}
    assert len(nodes) == 4 and addresses == {hosts.host_ip(h) for h in ("head", *hosts.state["hosts"])} - {
        hosts.host_ip("mlflow")}
    assert not addresses & {"127.0.0.1"}
    # Only the hosts' own addresses: the subnet of this cluster's bridge.
    assert all(a.startswith(hosts.network.subnet + ".") for a in addresses)
    status = cluster_cli(hosts, "status")
    assert status.returncode == 0 and "Hosts (own network namespaces)" in status.stdout
    # Each worker host has its own HOME / TMPDIR / data cache and nothing else reads them.
    homes = {h: process_environ(p).get("HOME") for h in ("worker-1", "worker-2", "worker-3")
             for p in hosts.processes(h) if p.name() == "raylet"}
    assert len(set(homes.values())) == 3 and all(str(hosts.state_dir / "nodes") in v for v in homes.values())

    params = job_params(hosts, workspace, "spans", **{"train.epochs": 1})
    job = start_training(hosts, workspace, params, "drill-spans")
    ranks = placement(hosts, job)
    logs = finished_ok(hosts, job)
    node_ranks = re.search(r"\[train\] 2 worker\(s\): ([^\n]*)", logs).group(1)
    print(f"\n[drill] placement: {node_ranks}")
    assert len(set(ranks.values())) == 2 and "head" not in ranks.values()
    assert sorted(re.findall(r"node rank (\d+)", node_ranks)) == ["0", "1"]


def test_cut_the_host_of_a_worker_rank_the_run_resumes_on_the_others(hosts, workspace):
    report = cut_a_training_host_and_recover(hosts, workspace, "cut-rank1", rank=1)
    # The healed, restarted host is used again: a 3-worker run needs every worker host.
    params = job_params(hosts, workspace, "after-heal", **{"train.epochs": 1, "train.num_workers": 3,
                                                             "train.batch_size": 48})
    job = start_training(hosts, workspace, params, "drill-after-heal")
    assert report["host"] in placement(hosts, job).values()
    finished_ok(hosts, job)


def test_cut_the_host_of_rank_0(hosts, workspace):
    cut_a_training_host_and_recover(hosts, workspace, "cut-rank0", rank=0)


def test_cut_the_mlflow_host_for_a_whole_epoch(hosts, workspace):
    params = job_params(hosts, workspace, "cut-mlflow", **{"train.epochs": EPOCHS})
    job = start_training(hosts, workspace, params, "drill-cut-mlflow")
    wait_for_log(hosts, job, r"\[train\] epoch 1/")
    cut = cluster_cli(hosts, "partition", "mlflow")  # the operator's command
    cut_at = time.monotonic()
    try:
        assert cut.returncode == 0, cut.stderr
        wait_for_log(hosts, job, r"\[train\] epoch 2/")
        wait_for_log(hosts, job, rf"\[train\]   step {2 * STEPS_PER_EPOCH + 2}/")  # a whole epoch passed
        assert not hosts.mlflow_healthy()
        cut_for = time.monotonic() - cut_at
        status = cluster_cli(hosts, "status")
        assert status.returncode == 1 and re.search(r"mlflow \d+ \[link CUT\]", status.stdout), status.stdout
    finally:
        healed = cluster_cli(hosts, "heal", "mlflow")
    assert healed.returncode == 0, healed.stderr
    logs = finished_ok(hosts, job)
    report = {"cut_s": round(cut_for, 1), "lost_records": "could not be logged" in logs,
              **mlflow_completeness(hosts, logs)}
    print(f"\n[drill] cut the MLflow host for epoch 2: {report}")
    assert not report["lost_records"], job_logs(hosts, job)[-3000:]
    assert_complete(report)
