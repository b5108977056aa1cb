"""`dvc exp run` drives the team cluster through the bucket (root: hosts of their own). From a fresh git +
DVC copy of the project with no shared folder, `dvc exp run -S cluster.submit=true` runs every stage as a Ray
job: download (from a mirror on the bridge, the stand-in for the internet) and preprocess each in a driver on
a worker host, tune, train (with the sweep's best values) and evaluate with their trials and Train workers on
the worker hosts; every output comes back into the workspace, where DVC hashes, locks and pushes it; a
clone's `dvc pull` gives the same files, and a second `dvc exp run` with nothing changed submits nothing."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from infra.cluster import hosts as hostnet
from tests.cluster_helpers import job_actors, job_info, local_cluster, reachable_folder, submit_job
from tests.fixtures.http_server import FileServer
from tests.fixtures.repository import fresh_repository, repository_env

why_not = hostnet.available()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(why_not is not None, reason=f"the team cluster on hosts of their own: {why_not}"),
]
DVC = ".venv/bin/dvc"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist (make setup)
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
         "t10k-labels-idx1-ubyte.gz")


@pytest.fixture(scope="module")
def team_hosts(tmp_path_factory):
    with reachable_folder("dvc-team") as state, local_cluster(
            state, num_workers=2, hosts=True, team=True, head_cpus=0) as cluster:
        yield cluster


def run(repo, env, *command: str, timeout: float = 900) -> str:
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


@pytest.fixture
def mirror(team_hosts):
    """Fashion-MNIST's four files over HTTP on the head's bridge address, which the worker hosts reach."""
    with FileServer(host=team_hosts.host_ip("head")) as server:
        for name in FILES:
            server.add(f"/fashion/{name}", FASHION_MNIST / name)
        yield server


def test_dvc_exp_run_drives_the_team_cluster_through_the_bucket(team_hosts, mirror, tmp_path):
    cluster = team_hosts
    repo = fresh_repository(tmp_path, {
        "download.fashion_mnist_local_dir": None,
        "download.fashion_mnist_mirrors": [f"{mirror.url}/fashion/"],
        "data.dataset": "fashion_mnist",
        "model.architecture": "mlp",
        "model.hidden_dims": [64],
        "model.likelihood": "bernoulli",
        "train.epochs": 2,
        "train.batch_size": 256,
        "train.num_workers": 2,
        "train.storage_path": f"{cluster.bucket_uri}/runs",
        "train.run_name": "dvc-team",
        "train.use_best_params": True,
        "tune.num_samples": 2,
        "tune.epochs": 1,
        "tune.grace_period": 1,
        "tune.workers_per_trial": 1,
        "tune.experiment_name": "dvc-team-sweep",
        "mlflow.experiment_name": "dvc-team",
        "mlflow.registered_model_name": None,
        "evaluate.num_importance_samples": 4,
        "evaluate.max_images": 256,
        "evaluate.fid": False,
    })
    env = {**repository_env(), **cluster.client_env()}
    output = run(repo, env, DVC, "exp", "run", "-S", "cluster.submit=true")
    for stage in ("download", "preprocess", "tune", "train", "evaluate"):
        assert f"Running stage '{stage}'" in output, stage
    jobs = re.findall(r"\[submit\] job (vae-(\w+)-\S+) on", output)
    assert [stage for _, stage in jobs] == ["download", "preprocess", "tune", "train", "evaluate"], jobs

    # Every job succeeded; the data stages' drivers, the sweep's trials and the Train workers ran on the
    # worker hosts (the head has no CPUs), not on this machine; the files came from the mirror to a worker.
    worker_ips = {cluster.host_ip(h) for h in ("worker-1", "worker-2")}
    workers = {n["node_id"] for n in cluster.nodes() if n.get("node_ip") in worker_ips}
    fetched = {r.client for r in mirror.requests if r.method == "GET"}
    assert fetched and fetched <= worker_ips, fetched
    for job, stage in jobs:
        info = job_info(cluster, job)
        assert info["status"] == "SUCCEEDED", job
        if stage in ("download", "preprocess"):
            assert info["driver_node_id"] in workers, (job, info["driver_node_id"])
        if stage in ("tune", "train"):
            placed = {a["node_id"] for a in job_actors(cluster, job, "RayTrainWorker", state="DEAD")}
            assert placed and placed <= workers, (job, placed)

    best = yaml.safe_load((repo / "reports/tune/best_params.yaml").read_text())
    config = json.loads((repo / "models/vae/model_config.json").read_text())
    assert config["latent_dim"] == best["params"]["latent_dim"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    for name in FILES:  # the downloaded files came back from the job byte for byte
        assert (repo / "data/raw/fashion_mnist" / name).read_bytes() == (FASHION_MNIST / name).read_bytes()
    for stage, path in (("download", "data/raw/fashion_mnist"),
                        ("preprocess", "data/processed/fashion_mnist"),
                        ("tune", "reports/tune"), ("train", "models/vae"), ("evaluate", "reports/eval"),
                        ("evaluate", "reports/metrics.json")):
        (out,) = [o for o in lock[stage]["outs"] if o["path"] == path]
        assert re.fullmatch(r"[0-9a-f]{32}(\.dir)?", out["md5"]), (stage, out)

    # The team's DVC remote in the bucket: push, clone, pull - the same files; nothing to run.
    run(repo, env, DVC, "remote", "add", "-d", "team", f"{cluster.bucket_uri}/dvc")
    run(repo, env, DVC, "remote", "modify", "team", "endpointurl", str(cluster.s3_url))
    git = ["git", "-c", "user.email=t@example.com", "-c", "user.name=t"]
    run(repo, env, "git", "add", "-A")
    run(repo, env, *git, "commit", "-q", "-m", "the experiment and the team remote")
    run(repo, env, DVC, "push")
    clone = tmp_path / "clone"
    run(tmp_path, env, "git", "clone", "-q", str(repo), str(clone))
    (clone / ".venv").symlink_to(repo / ".venv")
    run(clone, env, DVC, "pull")
    for name in (f"data/raw/fashion_mnist/{FILES[0]}", "data/processed/fashion_mnist/manifest.json",
                 "models/vae/model.safetensors", "reports/tune/best_params.yaml", "reports/metrics.json"):
        assert (clone / name).read_bytes() == (repo / name).read_bytes(), name

    again = run(repo, env, DVC, "exp", "run", "-S", "cluster.submit=true")
    assert "[submit] job" not in again and "Running stage" not in again, again[-3000:]


def process_ids(pid: int) -> tuple[set[int], set[int], int]:
    """(uids, gids, effective capabilities) of a process, from /proc/<pid>/status: the real, effective,
    saved and filesystem ids of each."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return ({int(v) for v in fields["Uid"].split()}, {int(v) for v in fields["Gid"].split()},
            int(fields["CapEff"].strip(), 16))


def test_no_process_of_the_stack_runs_as_root_and_a_job_reads_no_other_roles_secrets(team_hosts):
    """With --hosts only the `ip` commands need root. Every process of the started stack - each node's
    raylet, GCS, dashboard, agents and workers, the MLflow server, the S3 endpoint, PostgreSQL - runs with
    every uid and gid of its role's account and no capability. Then the attack: a job (any submitter's code)
    tries to read what other roles hold - the operator's credentials.json, the S3 endpoint's key file,
    MLflow's auth config (the admin password) and the environments of the MLflow server (the PostgreSQL
    password, the Flask key) and of the S3 endpoint - and is refused each one."""
    import pwd

    from infra.cluster import accounts, processes

    cluster = team_hosts
    owners = {"mlflow": accounts.MLFLOW_ACCOUNT, "s3": accounts.S3_ACCOUNT, "postgres": "postgres"}
    nodes = ["head", "worker-1", "worker-2", "mlflow", "s3", "postgres"]
    checked = set()
    for node in nodes:
        found = processes.find(cluster.cluster_id, node)
        assert found, f"no process of {node}"
        account = pwd.getpwnam(owners.get(node, accounts.RAY_ACCOUNT))
        for proc in found:
            uids, gids, capabilities = process_ids(proc.pid)
            assert (uids, gids, capabilities) == ({account.pw_uid}, {account.pw_gid}, 0), (
                node, processes.describe(proc), uids, gids, hex(capabilities))
            checked.add(proc.pid)
    everything = processes.find(cluster.cluster_id)
    gone = {proc.pid for proc in everything if not processes.alive(proc)}  # exited since
    assert {proc.pid for proc in everything} <= checked | gone
    assert len(checked) >= 10

    mlflow_pid = processes.find(cluster.cluster_id, "mlflow")[0].pid
    s3_pid = processes.find(cluster.cluster_id, "s3")[0].pid
    targets = [str(cluster.credentials_path), str(cluster.s3_keys_path), str(cluster.auth_config_path),
               f"/proc/{mlflow_pid}/environ", f"/proc/{s3_pid}/environ"]
    probe = ("import sys\n"
             "for path in sys.argv[1:]:\n"
             "    try:\n"
             "        open(path, 'rb').read(); print('READ', path)\n"
             "    except PermissionError:\n"
             "        print('DENIED', path)\n")
    result = submit_job(cluster, ["python", "-c", probe, *targets], timeout_s=300)
    assert result.returncode == 0, result.output
    assert re.findall(r"^(READ|DENIED) (\S+)$", result.output, re.M) == [("DENIED", t) for t in targets], \
        result.output
