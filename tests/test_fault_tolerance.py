"""Fault tolerance, proven by killing things on a real local multi-node Ray cluster (infra/local_cluster.py):
a head and two worker raylets, an MLflow server, and a shared storage folder. Training jobs go in with
`ray job submit`, exactly as a user submits them.

Each test reports what it measured (steps repeated, epochs resumed) on stdout (`pytest -s` shows it).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pyarrow.fs as pafs
import pytest

from pipeline.checkpoints import newest_persisted_checkpoint
from tests.cluster_helpers import (
    REPO_ROOT,
    job_actors,
    job_info,
    job_logs,
    local_cluster,
    stop_job,
    submit_job,
    wait_for_job,
    write_params,
)
from tests.fixtures.arrays import write_square_arrays

pytestmark = pytest.mark.slow

TRAIN, VALID, TEST = 1280, 128, 128
BATCH = 32
STEPS_PER_EPOCH = (TRAIN // 2) // (BATCH // 2)  # two workers


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with local_cluster(tmp_path_factory.mktemp("ft-cluster"), num_workers=2) as running:
        yield running


@pytest.fixture(scope="module")
def workspace(cluster):
    """The project root the jobs use (VAE_PROJECT_ROOT), on the cluster's shared storage, with tiny
    structured 28x28 arrays in the preprocess stage's layout."""
    root = Path(cluster.shared_storage) / "workspace"
    write_square_arrays(
        root / "data" / "processed" / "fashion_mnist", {"train": TRAIN, "valid": VALID, "test": TEST}, 220
    )
    return root


def job_params(cluster, workspace, name: str, **overrides) -> Path:
    values = {
        "data.dataset": "fashion_mnist",
        "model.architecture": "conv",
        "model.hidden_dims": [32, 64, 128],
        "model.latent_dim": 16,
        "model.likelihood": "bernoulli",
        "train.epochs": 4,
        "train.batch_size": BATCH,
        "train.num_workers": 2,
        "train.log_every_n_steps": 1,
        "train.print_steps": True,  # the tests follow the step lines
        "train.max_failures": 3,
        "train.run_name": name,
        "mlflow.experiment_name": "fault-tolerance",
        "mlflow.registered_model_name": None,
        "evaluate.num_image_rows": 2,
    }
    values.update(overrides)
    return write_params(workspace / f"params-{name}.yaml", values)


def runtime_env(cluster, workspace) -> dict:
    return {
        "env_vars": {
            "VAE_PROJECT_ROOT": str(workspace),
            "MLFLOW_TRACKING_URI": cluster.mlflow_url,
            "RAY_CHDIR_TO_TRIAL_DIR": "0",
        }
    }


def start_training(cluster, workspace, params: Path, submission_id: str) -> str:
    result = submit_job(
        cluster,
        ["python", "-m", "pipeline.train", "--params", str(params)],
        working_dir=REPO_ROOT,
        runtime_env=runtime_env(cluster, workspace),
        submission_id=submission_id,
        no_wait=True,
    )
    assert result.returncode == 0, result.output
    return submission_id


def wait_for_log(cluster, submission_id: str, pattern: str, timeout_s: float = 300) -> re.Match:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = re.search(pattern, job_logs(cluster, submission_id))
        if found:
            return found
        status = job_info(cluster, submission_id)["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            raise AssertionError(
                f"job {submission_id} ended ({status}) before "
                f"{pattern!r}:\n{job_logs(cluster, submission_id)[-3000:]}"
            )
        time.sleep(0.5)
    raise TimeoutError(f"{pattern!r} not in the logs of {submission_id} after {timeout_s}s")


def steps_logged(logs: str) -> list[int]:
    return [int(s) for s in re.findall(r"\[train\]   step (\d+)/", logs)]


def epochs_logged(logs: str) -> list[int]:
    return [int(e) for e in re.findall(r"\[train\] epoch (\d+)/", logs)]


def finished_ok(cluster, submission_id: str, timeout_s: float = 600) -> str:
    info = wait_for_job(cluster, submission_id, timeout_s=timeout_s)
    logs = job_logs(cluster, submission_id)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-4000:]}"
    return logs


def train_worker_processes(cluster, job: str, node: str | None = None) -> list[psutil.Process]:
    """The live Ray Train worker processes of a job, on one node or on all: the RayTrainWorker actors Ray's
    state API lists for the job, matched to the cluster's processes (every rank, whichever prints)."""
    pids = {int(actor["pid"]) for actor in job_actors(cluster, job, "RayTrainWorker") if actor.get("pid")}
    return [process for process in cluster.processes(node) if process.pid in pids]


def test_killed_train_worker_restarts_from_last_checkpoint(cluster, workspace):
    params = job_params(cluster, workspace, "kill-worker", **{"train.epochs": 3})
    job = start_training(cluster, workspace, params, "ft-kill-worker")
    # Early in epoch 2, right after epoch 1's checkpoint was written: Ray's controller may not have registered
    # it yet (it polls every ~2 s); the run must resume from it all the same.
    found = wait_for_log(
        cluster, job, rf"\(RayTrainWorker pid=(\d+)[^\n]*\[train\]   step {STEPS_PER_EPOCH + 2}/"
    )
    victim = psutil.Process(int(found.group(1)))  # rank 0, which prints the step lines
    assert victim in cluster.processes(), f"pid {victim.pid} is not a process of the local cluster"
    victim.kill()
    victim.wait(timeout=30)
    logs = finished_ok(cluster, job)
    resumed = re.findall(r"resumed from the checkpoint of epoch (\d+) \(step (\d+)\)", logs)
    assert resumed, logs[-3000:]
    steps = steps_logged(logs)
    repeated = len(steps) - len(set(steps))
    print(
        "\n[fault 1] killed a Train worker early in epoch 2: "
        f"resumed at epoch {resumed[-1][0]}, {repeated} steps "
        f"repeated (checkpoint interval {STEPS_PER_EPOCH} steps)"
    )
    assert [int(epoch) for epoch, _ in resumed] == [1]  # the last checkpoint, not a restart from scratch
    assert 0 < repeated <= STEPS_PER_EPOCH
    assert max(steps) == 3 * STEPS_PER_EPOCH and sorted(set(epochs_logged(logs))) == [1, 2, 3]
    metrics = json.loads((workspace / "reports/train_metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["steps"] == 3 * STEPS_PER_EPOCH


def test_killed_worker_node_training_goes_on_elastically(cluster, workspace):
    params = job_params(cluster, workspace, "kill-node", **{"train.min_workers": 1, "train.epochs": 3})
    job = start_training(cluster, workspace, params, "ft-kill-node")
    wait_for_log(cluster, job, rf"\[train\]   step {STEPS_PER_EPOCH + STEPS_PER_EPOCH // 2}/")
    # A worker node that trains this job now: the head has 1 CPU, so at least one of the two ranks is on a
    # worker node, whichever rank that is (only rank 0 prints, so the logs cannot tell).
    deadline = time.monotonic() + 60
    while not (
        nodes := [n for n in ("worker-1", "worker-2") if train_worker_processes(cluster, job, n)]
    ):
        assert time.monotonic() < deadline, f"no Train worker of {job} found on a worker node"
        time.sleep(1)
    assert len(train_worker_processes(cluster, job)) == 2  # every rank found, not only the one that prints
    node = nodes[0]
    cluster.kill_node(node)
    try:
        logs = finished_ok(cluster, job)
    finally:
        cluster.start_node(node)
        cluster.wait_for_nodes(3)
    resumed = [
        int(e) for e, _ in re.findall(r"resumed from the checkpoint of epoch (\d+) \(step (\d+)\)", logs)
    ]
    print(f"\n[fault 2] killed node {node} mid-epoch 2: resumed from epoch {resumed}, run completed")
    assert resumed and resumed[-1] >= 1  # nothing before the last checkpoint was lost
    metrics = json.loads((workspace / "reports/train_metrics.json").read_text())
    assert metrics["epochs"] == 3


def test_stopped_job_driver_resubmitted_resumes_without_retraining(cluster, workspace):
    params = job_params(cluster, workspace, "kill-driver", **{"train.epochs": 3})
    first = start_training(cluster, workspace, params, "ft-driver-1")
    wait_for_log(cluster, first, rf"\[train\]   step {STEPS_PER_EPOCH + 3}/")
    stop_job(cluster, first)
    wait_for_job(cluster, first, timeout_s=120)
    finished_before = epochs_logged(job_logs(cluster, first))
    # An epoch's log line comes before its checkpoint is written: the stop can land in between, and that
    # epoch must then be trained again. What counts is the newest complete checkpoint on storage.
    run_dir = next((workspace / "runs").glob("kill-driver-*"))
    persisted = newest_persisted_checkpoint(pafs.LocalFileSystem(), str(run_dir))
    assert persisted is not None, f"no complete checkpoint in {run_dir} after epochs {finished_before}"
    checkpointed = int(persisted[1]["epoch"])
    second = start_training(cluster, workspace, params, "ft-driver-2")
    logs = finished_ok(cluster, second)
    resumed = re.findall(r"resumed from the checkpoint of epoch (\d+)", logs)
    print(
        "\n[fault 3] stopped the job driver after epochs "
        f"{sorted(set(finished_before))} (checkpoint of epoch {checkpointed} on storage); "
        f"the new job resumed from epoch {resumed} and trained epochs {sorted(set(epochs_logged(logs)))}"
    )
    assert checkpointed >= 1  # stopped in epoch 2 or later
    assert resumed and int(resumed[0]) == checkpointed
    assert sorted(set(epochs_logged(logs))) == list(range(checkpointed + 1, 4))  # no checkpointed epoch again


def test_mlflow_outage_does_not_stop_training_and_metrics_arrive_later(cluster, workspace):
    params = job_params(cluster, workspace, "mlflow-outage", **{"train.epochs": 3})
    job = start_training(cluster, workspace, params, "ft-mlflow")
    wait_for_log(cluster, job, r"\[train\]   step 3/")
    cluster.stop_mlflow()
    try:
        wait_for_log(
            cluster, job, rf"\[train\]   step {STEPS_PER_EPOCH + 5}/"
        )  # an epoch passed in the outage
    finally:
        cluster.start_mlflow()
    logs = finished_ok(cluster, job)
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", logs).group(1)
    client = mlflow.MlflowClient(cluster.mlflow_url)
    history = client.get_metric_history(run_id, "val_negative_elbo")
    lost_file = next(Path(workspace / "runs").glob("mlflow-outage-*/lost_mlflow_records.json"), None)
    lost = json.loads(lost_file.read_text())["records"] if lost_file else []
    print(
        f"\n[fault 4] MLflow server down during epoch 1-2: {len(history)} of 3 epoch records logged, "
        f"{len(lost)} recorded as lost"
    )
    assert len(history) + sum(1 for r in lost if "val_negative_elbo" in (r["payload"] or {})) == 3
    assert client.get_run(run_id).info.status == "FINISHED"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"train.use_gpu": True}, r"GPU"),
        ({"train.storage_path": "/proc/vae-runs"}, r"storage_path .* not writable"),
    ],
)
def test_bad_configuration_fails_fast_on_the_cluster(cluster, workspace, overrides, expected):
    params = job_params(cluster, workspace, "bad-config", **overrides)
    started = time.monotonic()
    result = submit_job(
        cluster,
        ["python", "-m", "pipeline.train", "--params", str(params)],
        working_dir=REPO_ROOT,
        runtime_env=runtime_env(cluster, workspace),
        timeout_s=180,
    )
    seconds = time.monotonic() - started
    print(f"\n[fault 6] {overrides}: failed in {seconds:.0f}s")
    assert result.returncode != 0
    assert re.search(expected, result.output), result.output[-2000:]


def test_unreachable_cluster_address_fails_fast(tmp_path):
    params = write_params(  # settings that fit the 4 images: only the address is wrong
        tmp_path / "params.yaml", {"cluster.address": "127.0.0.1:9", "data.processed_dir": str(tmp_path),
                                   "train.batch_size": 4, "train.num_workers": 1}
    )
    (tmp_path / "celeba").mkdir()
    np.save(tmp_path / "celeba" / "train_images.npy", np.zeros((4, 3, 64, 64), np.uint8))
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--params", str(params)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "VAE_PROJECT_ROOT": str(tmp_path)},
    )
    seconds = time.monotonic() - started
    print(f"\n[fault 6] unreachable address: exit {done.returncode} in {seconds:.0f}s")
    assert done.returncode == 1 and seconds < 60
    assert "no Ray cluster answers at '127.0.0.1:9'" in done.stderr


def test_stages_with_cluster_submit_run_as_jobs_and_bring_outputs_back(cluster, workspace, tmp_path):
    """`cluster.submit: true`: `python -m pipeline.train` / `pipeline.evaluate` (what `dvc repro` runs) submit
    themselves with `ray job submit` and leave their outputs in the local workspace."""
    local = tmp_path / "workspace"
    data = local / "data" / "processed" / "fashion_mnist"
    data.mkdir(parents=True)
    for split in ("train", "valid", "test"):
        np.save(
            data / f"{split}_images.npy",
            np.load(workspace / "data/processed/fashion_mnist" / f"{split}_images.npy")[:256],
        )
    params = job_params(
        cluster,
        workspace,
        "submitted",
        **{
            "train.epochs": 1,
            "cluster.submit": True,
            "cluster.shared_dir": str(Path(cluster.shared_storage) / "dvc"),
            "evaluate.num_importance_samples": 4,
            "evaluate.importance_batch_size": 4,
        },
    )
    env = {**cluster.subprocess_env(), "VAE_PROJECT_ROOT": str(local)}
    for stage, output in (
        ("pipeline.train", "models/vae/model.safetensors"),
        ("pipeline.evaluate", "reports/metrics.json"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", stage, "--params", str(params)],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "job succeeded" in done.stdout and (local / output).is_file(), stage
    assert json.loads((local / "reports/metrics.json").read_text())["num_test_images"] == TEST
