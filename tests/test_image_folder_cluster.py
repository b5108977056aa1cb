"""Your own images on the local multi-node team cluster (`up --team`: a head and two worker nodes, the S3
endpoint, MLflow on PostgreSQL): a folder of real photographs in the team bucket goes through every stage as
Ray jobs (`dvc exp run -S cluster.submit=true`); the preprocess job decodes with Ray Data tasks on both
worker nodes, and its arrays are the same bytes as one process makes from the same prefix."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from benchmarks.photo_folders import photo_folder
from pipeline.image_folder_stage import preprocess_image_folder
from tests.cluster_helpers import job_info, job_tasks, local_cluster
from tests.fixtures.repository import fresh_repository, repository_env

pytestmark = pytest.mark.slow
DVC = ".venv/bin/dvc"


@pytest.fixture(scope="module")
def team_hosts(tmp_path_factory):
    # Two CPUs per worker node: the preprocess job's driver holds one, Ray Data's tasks take the others on
    # both nodes.
    with local_cluster(tmp_path_factory.mktemp("images-team"), num_workers=2, team=True, head_cpus=0,
                       worker_cpus=2) as cluster:
        yield cluster


def run(repo, env, *command: str, timeout: float = 900) -> str:
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def test_photographs_in_the_bucket_go_through_every_stage_as_jobs_decoded_on_both_workers(
        team_hosts, tmp_path, monkeypatch):
    cluster = team_hosts
    env = {**repository_env(), **cluster.client_env()}
    for key, value in cluster.client_env().items():
        monkeypatch.setenv(key, value)
    folder = tmp_path / "photos"
    names = photo_folder(folder, 300, seed=21)
    prefix = f"{cluster.bucket_uri}/photos"
    import boto3

    bucket, _, key_prefix = prefix[len("s3://"):].partition("/")
    client = boto3.client("s3", endpoint_url=str(cluster.s3_url))
    for name in names:
        client.put_object(Bucket=bucket, Key=f"{key_prefix}/{name}", Body=(folder / name).read_bytes())

    repo = fresh_repository(tmp_path, {
        "data.dataset": "image_folder",
        "data.image_folder": prefix,
        "data.image_size": 16,
        "data.class_folders": True,
        "model.hidden_dims": [16, 32],
        "model.latent_dim": 8,
        "train.epochs": 1,
        "train.batch_size": 32,
        "train.storage_path": f"{cluster.bucket_uri}/runs",
        "mlflow.experiment_name": "images-team",
        "evaluate.num_importance_samples": 4,
        "evaluate.importance_batch_size": 4,
        "evaluate.num_image_rows": 2,
        "evaluate.fid": False,
    })
    output = run(repo, env, DVC, "exp", "run", "-S", "cluster.submit=true")
    jobs = dict((stage, job) for job, stage in re.findall(r"\[submit\] job (vae-(\w+)-\S+) on", output))
    assert list(jobs) == ["download", "preprocess", "train", "evaluate"], output[-3000:]  # no sweep wanted
    assert all(job_info(cluster, job)["status"] == "SUCCEEDED" for job in jobs.values())
    # Ray's own record of the decode tasks: they ran on both worker nodes (the head has no CPUs).
    tasks = job_tasks(cluster, jobs["preprocess"], "MapBatches(_decode_batch)")
    worker_nodes = {node["node_id"] for node in cluster.nodes() if not node.get("is_head_node")}
    assert tasks and {task["state"] for task in tasks} == {"FINISHED"}, tasks
    assert {task["node_id"] for task in tasks} == worker_nodes, (tasks, worker_nodes)

    manifest = json.loads((repo / "data/processed/image_folder/manifest.json").read_text())
    single = preprocess_image_folder(prefix, tmp_path / "one-process", image_size=16, class_folders=True,
                                     num_workers=1, engine="processes")
    assert manifest == single  # every array's sha256, every image's split and row
    assert (repo / "data/processed/image_folder/train_images.npy").read_bytes() == (
        tmp_path / "one-process" / "train_images.npy").read_bytes()
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["num_test_images"] == manifest["splits"]["test"]["count"]

    # DVC depends on the prefix itself: an object added there re-runs preprocess (and only then)
    lock = (repo / "dvc.lock").read_text()
    assert prefix in lock
    assert "up to date" in run(repo, env, DVC, "status")
    client.put_object(Bucket=bucket, Key=f"{key_prefix}/astronaut/extra.png",
                      Body=(folder / names[0]).read_bytes())
    assert prefix in run(repo, env, DVC, "status")
