"""The team deployment on one machine (`infra/local-cluster.sh up --team`): a Ray head and two worker nodes
that share no folder, each with its own data cache; data, checkpoints and stage outputs on an S3 endpoint;
MLflow on PostgreSQL behind basic-auth with artifacts proxied to the bucket. The README's walk-through
(publish the data, `ray job submit` train, change the workspace, `ray job submit` evaluate, fetch the outputs)
and the faults of this stack: the store unavailable for ~30 s, PostgreSQL restarted, a worker node killed.
Every command runs as a user types it (``ray job submit`` in a subprocess)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.checkpoints import checkpoint_epoch, read_persisted_state
from tests.cluster_helpers import (
    REPO_ROOT,
    job_logs,
    local_cluster,
    submit_job,
    wait_for_job,
)
from tests.fixtures.arrays import write_manifest, write_square_arrays

pytestmark = pytest.mark.slow

COUNTS = {"train": 512, "valid": 64, "test": 64}
BATCH = 32


@pytest.fixture(scope="module")
def team(tmp_path_factory):
    """The team cluster (head with 0 CPUs, so Train workers land one per worker node), with its endpoint and
    credentials in this process's AWS and MLflow variables, as `source env.sh` sets them."""
    with local_cluster(tmp_path_factory.mktemp("team"), num_workers=2, team=True, head_cpus=0) as cluster:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in cluster.client_env().items():
                patch.setenv(key, value)
            patch.delenv("VAE_DATA_CACHE", raising=False)
            patch.setenv("VAE_DATA_CACHE", str(tmp_path_factory.mktemp("submitter-cache")))
            yield cluster


@pytest.fixture(scope="module")
def dataset(team, tmp_path_factory) -> str:
    """Tiny arrays published to the bucket as the preprocess stage publishes them; returns
    data.processed_dir."""
    local = write_square_arrays(tmp_path_factory.mktemp("built") / "fashion_mnist", COUNTS, 220)
    write_manifest(local)
    storage.publish_dataset(local, f"{team.bucket_uri}/processed/fashion_mnist")
    return f"{team.bucket_uri}/processed"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The working tree a user submits: the repository's files (tracked and new, not ignored)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    root = tmp_path_factory.mktemp("workdir")
    for name in files:
        skipped = name.startswith(("tests/", "benchmarks/", "infra/screenshots"))
        if (REPO_ROOT / name).is_file() and not skipped:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, root / name)
    return root


def params_uri(team, dataset: str, name: str, **overrides) -> str:
    """A params file on the object store (nodes share no folder), written with infra/cluster_params.py."""
    values = {
        "data.dataset": "fashion_mnist",
        "data.processed_dir": dataset,
        "train.storage_path": f"{team.bucket_uri}/runs",
        "model.architecture": "mlp",
        "model.hidden_dims": [64],
        "model.latent_dim": 4,
        "model.likelihood": "bernoulli",
        "train.epochs": 4,
        "train.batch_size": BATCH,
        "train.num_workers": 2,
        "train.log_every_n_steps": 4,
        "train.max_failures": 3,
        "train.run_name": name,
        "mlflow.experiment_name": "team",
        "mlflow.registered_model_name": None,
        "evaluate.num_importance_samples": 4,
        "evaluate.num_image_rows": 2,
        "evaluate.fid": False,
        "evaluate.latent_scatter": "none",  # the tiny arrays have no class labels
        **overrides,
    }
    location = f"{team.bucket_uri}/params/{name}.yaml"
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={json.dumps(value)}")]
    done = subprocess.run([sys.executable, "infra/cluster_params.py", *sets, "-o", location], cwd=REPO_ROOT,
                          env=team.subprocess_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return location


def lineage() -> dict:
    """What the README's `--runtime-env-json "$(python -m pipeline.jobs runtime-env)"` passes."""
    done = subprocess.run([sys.executable, "-m", "pipeline.jobs", "runtime-env"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)


def submit(team, workdir: Path, module: str, params: str, submission_id: str, wait: bool = True):
    result = submit_job(team, ["python", "-m", module, "--params", params], working_dir=workdir,
                        runtime_env=lineage(), submission_id=submission_id, no_wait=not wait)
    if wait:
        assert result.returncode == 0, result.output[-5000:]
    return result


def wait_for(team, submission_id: str, pattern: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.search(pattern, job_logs(team, submission_id)):
            return
        time.sleep(0.5)
    logs = job_logs(team, submission_id)
    raise TimeoutError(f"{pattern!r} not in the logs of {submission_id}:\n{logs[-3000:]}")


def succeeded(team, submission_id: str) -> str:
    info = wait_for_job(team, submission_id, timeout_s=600)
    logs = job_logs(team, submission_id)
    assert info["status"] == "SUCCEEDED", f"{info.get('message')}\n{logs[-5000:]}"
    return logs


def run_folder(logs: str) -> str:
    return re.search(r"checkpoints in (s3://\S+),", logs).group(1)


def mlflow_client():
    """A client of the team's server (explicitly: earlier tests in the session may have set MLflow's global
    tracking URI); credentials from MLFLOW_TRACKING_USERNAME/PASSWORD, as env.sh sets them."""
    import mlflow

    return mlflow.MlflowClient(tracking_uri=os.environ["MLFLOW_TRACKING_URI"])


STEPS_PER_EPOCH = COUNTS["train"] // BATCH  # global batches: the same with 1 or 2 workers


def epoch_steps(run_id: str, key: str = "val_negative_elbo") -> list[int]:
    """The steps at which the run's per-epoch metric was logged (rank 0 logs it at the epoch's last step)."""
    return sorted(m.step for m in mlflow_client().get_metric_history(run_id, key))


def every_epoch(epochs: int) -> list[int]:
    return [STEPS_PER_EPOCH * epoch for epoch in range(1, epochs + 1)]


def test_mlflow_refuses_requests_without_credentials_and_secrets_stay_private(team):
    url = f"{team.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
    for auth in (None, "admin:wrong-password"):
        request = urllib.request.Request(url)
        if auth:
            import base64

            request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401
    assert mlflow_client().search_experiments(max_results=1) is not None  # MLFLOW_TRACKING_USERNAME/PASSWORD
    for path in (team.env_path, team.credentials_path, team.auth_config_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    secrets = json.loads(team.credentials_path.read_text())
    public = [team.state_path, *team.logs_dir.glob("*.log")]
    for path in public:
        text = path.read_text(errors="replace")
        for name in ("postgres_password", "mlflow_admin_password", "aws_secret_access_key"):
            assert secrets[name] not in text, (name, path)
    assert not team.shared_storage.exists()  # nothing shared between the nodes


def _secrets(team) -> dict[str, str]:
    """Every generated secret of the deployment, plain and URL-quoted (as in a PostgreSQL URI)."""
    from urllib.parse import quote

    values = json.loads(team.credentials_path.read_text())
    names = ("postgres_password", "mlflow_admin_password", "mlflow_pipeline_password", "flask_secret_key",
             "aws_secret_access_key")
    return {f"{name}{kind}": form for name in names
            for kind, form in (("", values[name]), (" (quoted)", quote(values[name], safe="")))}


def test_no_process_of_the_stack_has_a_secret_on_its_command_line(team):
    """Any user of the machine reads every process's /proc/<pid>/cmdline (`ps`): none of the stack's
    processes (Ray nodes, MLflow, the S3 endpoint, PostgreSQL, their children) may show a password or key."""
    procs = team.processes()
    assert all(team.processes(name) for name in ("mlflow", "s3", "postgres"))
    seen = 0
    for proc in procs:
        try:
            cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:  # exited meanwhile
            continue
        seen += 1
        for name, secret in _secrets(team).items():
            leaked = secret in cmdline  # not in the assert: pytest would print the secret
            assert not leaked, (name, proc.pid, cmdline.replace(secret, "***")[:200])
    assert seen >= 10, seen  # the raylets, GCS, dashboard, agents, workers and the three services


def test_jobs_and_shells_use_a_non_admin_mlflow_account_that_cannot_manage_users(team):
    """env.sh and every raylet (so every job) carry the pipeline's account, never the admin's: it logs runs
    to experiments it creates, and is refused (403) creating users or granting itself permissions on an
    experiment the admin made."""
    import base64

    import mlflow

    secrets = json.loads(team.credentials_path.read_text())
    env = team.client_env()
    assert env["MLFLOW_TRACKING_USERNAME"] == "vae-pipeline"
    assert secrets["mlflow_admin_password"] not in team.env_path.read_text()
    for proc in team.processes():
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().decode(errors="replace") \
            if Path(f"/proc/{proc.pid}").exists() else ""
        assert secrets["mlflow_admin_password"] not in environ, proc.pid

    def call(user: str, password: str, path: str, payload: dict) -> int:
        request = urllib.request.Request(f"{team.mlflow_url}/api/2.0/mlflow/{path}",
                                         data=json.dumps(payload).encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    pipeline = (env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    admin = ("admin", secrets["mlflow_admin_password"])
    assert call(*pipeline, "users/create", {"username": "intruder", "password": "x" * 12}) == 403
    assert call(*admin, "experiments/create", {"name": "admins-only"}) == 200
    admins_only = mlflow.MlflowClient(tracking_uri=team.mlflow_url).get_experiment_by_name("admins-only")
    grant = {"experiment_id": admins_only.experiment_id, "username": "vae-pipeline", "permission": "MANAGE"}
    assert call(*pipeline, "experiments/permissions/create", grant) == 403
    with pytest.raises(Exception, match="PERMISSION_DENIED|403"):
        mlflow_client().create_run(admins_only.experiment_id)  # READ on what the admin made
    own = mlflow_client().create_experiment("pipeline-own")
    run = mlflow_client().create_run(own)
    mlflow_client().log_metric(run.info.run_id, "loss", 1.0, step=0)
    assert [m.value for m in mlflow_client().get_metric_history(run.info.run_id, "loss")] == [1.0]


def test_walkthrough_train_then_evaluate_after_the_workspace_changed(team, dataset, workdir, tmp_path):
    params = params_uri(team, dataset, "walk")
    logs = submit(team, workdir, "pipeline.train", params, "team-train-1").output
    folder = run_folder(logs)
    # A log a person reads: one line per epoch from rank 0, no per-rank metric dumps, no pickle warning.
    assert len(re.findall(r"\[train\] epoch \d/4", logs)) == 4
    assert "Reporting training result" not in logs and "Pickle" not in logs and "[train]   step" not in logs
    assert "Checkpoint successfully created" not in logs  # the first line names the checkpoint folder
    assert logs.count("View run") == 1  # MLflow's link, once, when the run ends
    epochs = sorted(checkpoint_epoch(name) for name in {p.split("/")[0] for p in storage.list_files(folder)})
    assert epochs[-1] == 4, epochs
    # Each worker node read the data through its own cache; the nodes share no folder.
    for node in ("worker-1", "worker-2"):
        cached = list((team.node_cache(node) / "data").glob("*/train_images.npy"))
        assert cached, f"{node} has no cached copy of the data"

    (workdir / "NOTES.md").write_text("the workspace changed after training\n")  # a new Ray package
    evaluated = submit(team, workdir, "pipeline.evaluate", params, "team-eval-1").output
    assert f"outputs also in {folder}/outputs" in evaluated, evaluated[-3000:]

    metrics = json.loads(storage.read_bytes(f"{folder}/outputs/reports/train_metrics.json"))
    run = mlflow_client().get_run(metrics["mlflow_run_id"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    assert run.data.tags["git_commit"] == head and run.data.tags["mlflow.source.git.commit"] == head
    assert "test_nll" in run.data.metrics and run.info.status == "FINISHED"
    assert epoch_steps(run.info.run_id) == every_epoch(4)
    artifacts = {a.path for a in mlflow_client().list_artifacts(run.info.run_id)}
    assert "train_metrics.json" in artifacts  # proxied by the server into the bucket
    assert any(p.startswith("mlflow/") for p in storage.list_files(team.bucket_uri))

    fetched = subprocess.run([sys.executable, "-m", "pipeline.jobs", "fetch", "--params", params, "--to",
                              str(tmp_path)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert fetched.returncode == 0, fetched.stderr
    assert (tmp_path / "models/vae/model.safetensors").is_file()
    assert json.loads((tmp_path / "reports/metrics.json").read_text())["num_test_images"] == COUNTS["test"]

    # Submitted again, the finished run resumes from its object-store checkpoint into the same MLflow run.
    again = submit(team, workdir, "pipeline.train", params, "team-train-2").output
    assert f"MLflow run {metrics['mlflow_run_id']}" in again
    assert "[train] epoch" not in again  # nothing trained twice


def checkpoints_all_complete(folder: str) -> list[int]:
    """Every checkpoint folder of a run reads back with the epoch its name says."""
    filesystem, path = storage.filesystem(folder)
    epochs = []
    folders = {p.split("/")[0] for p in storage.list_files(folder)}
    for name in sorted(f for f in folders if checkpoint_epoch(f)):
        state = read_persisted_state(filesystem, f"{path}/{name}")
        assert int(state["epoch"]) == checkpoint_epoch(name), name
        epochs.append(int(state["epoch"]))
    return epochs


def test_the_store_unavailable_for_30s_during_a_checkpoint_write(team, dataset, workdir):
    params = params_uri(team, dataset, "s3-outage", **{"train.epochs": 5})
    submit(team, workdir, "pipeline.train", params, "team-s3-outage", wait=False)
    wait_for(team, "team-s3-outage", r"\[train\] epoch 1/5")
    (moto,) = [p for p in team.processes("s3")]
    moto.send_signal(signal.SIGSTOP)  # connections hang: the next checkpoint upload waits on the store
    try:
        time.sleep(30)
    finally:
        moto.send_signal(signal.SIGCONT)
    logs = succeeded(team, "team-s3-outage")
    folder = run_folder(logs)
    assert checkpoints_all_complete(folder)[-1] == 5
    metrics = json.loads(storage.read_bytes(f"{folder}/outputs/reports/train_metrics.json"))
    assert metrics["epochs"] == 5
    assert epoch_steps(metrics["mlflow_run_id"]) == every_epoch(5)


def test_the_store_killed_mid_run_and_started_again(team, dataset, workdir):
    """SIGKILL of the S3 endpoint while a run trains, then `up` on the running cluster starts it again: it
    serves every object it acknowledged under the same key pair (the running job's workers hold it), so the
    run finishes with every checkpoint readable and every epoch in MLflow once."""
    params = params_uri(team, dataset, "s3-kill", **{"train.epochs": 5})
    submit(team, workdir, "pipeline.train", params, "team-s3-kill", wait=False)
    wait_for(team, "team-s3-kill", r"\[train\] epoch 2/5")
    key_before = team.credentials()["aws_access_key_id"]
    objects_before = set(storage.list_files(f"{team.bucket_uri}/processed"))
    (endpoint,) = team.processes("s3")
    endpoint.kill()
    endpoint.wait(10)
    time.sleep(3)
    assert "restarted s3" in team.up()["note"]
    assert team.credentials()["aws_access_key_id"] == key_before
    assert set(storage.list_files(f"{team.bucket_uri}/processed")) == objects_before
    logs = succeeded(team, "team-s3-kill")
    folder = run_folder(logs)
    assert checkpoints_all_complete(folder)[-1] == 5
    metrics = json.loads(storage.read_bytes(f"{folder}/outputs/reports/train_metrics.json"))
    assert metrics["epochs"] == 5
    assert epoch_steps(metrics["mlflow_run_id"]) == every_epoch(5)


def test_postgres_restarted_mid_run_loses_no_mlflow_records(team, dataset, workdir):
    params = params_uri(team, dataset, "pg-restart", **{"train.epochs": 5})
    submit(team, workdir, "pipeline.train", params, "team-pg-restart", wait=False)
    wait_for(team, "team-pg-restart", r"\[train\] epoch 1/5")
    team._terminate(team.processes("postgres"), sig=signal.SIGINT, grace_s=15)  # fast shutdown
    time.sleep(8)
    team.start_postgres()
    logs = succeeded(team, "team-pg-restart")
    metrics = json.loads(storage.read_bytes(f"{run_folder(logs)}/outputs/reports/train_metrics.json"))
    # One value per epoch and per logged step, none missing, none twice.
    assert epoch_steps(metrics["mlflow_run_id"]) == every_epoch(5)
    steps = epoch_steps(metrics["mlflow_run_id"], "loss")
    assert steps == list(range(4, 5 * STEPS_PER_EPOCH + 1, 4))  # train.log_every_n_steps = 4


def test_a_killed_worker_node_resumes_from_the_object_store_checkpoint(team, dataset, workdir):
    params = params_uri(team, dataset, "node-kill", **{"train.epochs": 5, "train.min_workers": 1})
    submit(team, workdir, "pipeline.train", params, "team-node-kill", wait=False)
    wait_for(team, "team-node-kill", r"\[train\] epoch 2/5")
    team.kill_node("worker-2")  # the host is gone, with its cache
    try:
        logs = succeeded(team, "team-node-kill")
    finally:
        team.start_node("worker-2")
        team.wait_for_nodes(3)
    folder = run_folder(logs)
    assert checkpoints_all_complete(folder)[-1] == 5
    resumed = re.findall(r"\[train\] resumed from the checkpoint of epoch (\d)", logs)
    # From a checkpoint in the bucket, not from scratch (an epoch's log line precedes its checkpoint, so the
    # newest complete one may be that of the epoch before).
    assert resumed and 1 <= int(resumed[-1]) <= 4, logs[-4000:]
    metrics = json.loads(storage.read_bytes(f"{folder}/outputs/reports/train_metrics.json"))
    assert sorted(set(epoch_steps(metrics["mlflow_run_id"]))) == every_epoch(5)


def test_down_keeps_the_data_and_up_brings_it_back(team):
    runs_before = {r.info.run_id for r in mlflow_client().search_runs(
        [mlflow_client().get_experiment_by_name("team").experiment_id])}
    objects_before = set(storage.list_files(f"{team.bucket_uri}/runs"))
    note = team.down()["note"]
    assert "kept" in note and "S3 objects" in note
    team.up()
    for key, value in team.client_env().items():  # a new S3 key pair per start
        os.environ[key] = value
    assert set(storage.list_files(f"{team.bucket_uri}/runs")) == objects_before
    runs_after = {r.info.run_id for r in mlflow_client().search_runs(
        [mlflow_client().get_experiment_by_name("team").experiment_id])}
    assert runs_after == runs_before


def stage(repo: Path, team, name: str, *args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """``python -m pipeline.<name> --params params.yaml`` as `dvc repro` runs it in the clone ``repo``."""
    env = {k: v for k, v in team.subprocess_env().items() if k != "VAE_PROJECT_ROOT"}
    command = [sys.executable, "-m", f"pipeline.{name}", "--params", "params.yaml", *args]
    if popen:
        return subprocess.Popen(command, cwd=repo, env=env, text=True, **popen)
    return subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=900)


def test_stages_submitted_through_the_bucket_bring_their_outputs_back(team, workdir, tmp_path):
    """`cluster.submit: true` with checkpoints in the bucket and no shared folder: tune, train (with the
    sweep's best values) and evaluate each submit themselves as a Ray job from a clone of the repository, read
    their inputs from the bucket (the workspace's arrays published under their hash) and leave their
    declared outputs in the workspace. The clone changes between the tune and the train job (Ray hands the
    train job another working copy) and the train job still trains the sweep's best values, read from the
    sweep's storage folder; `pipeline.jobs fetch` gets the same files."""
    repo = tmp_path / "clone"
    shutil.copytree(workdir, repo)
    data = write_square_arrays(repo / "data" / "processed" / "fashion_mnist", COUNTS, 220)
    write_manifest(data)
    values = {
        "data": {"dataset": "fashion_mnist", "processed_dir": "data/processed"},
        "model": {"architecture": "mlp", "hidden_dims": [64], "latent_dim": 4, "likelihood": "bernoulli"},
        "train": {"epochs": 2, "batch_size": BATCH, "num_workers": 2, "run_name": "via-bucket",
                  "storage_path": f"{team.bucket_uri}/runs", "use_best_params": True, "max_failures": 1},
        "tune": {"num_samples": 2, "epochs": 1, "grace_period": 1, "workers_per_trial": 1,
                 "experiment_name": "team-sweep"},
        "mlflow": {"experiment_name": "team", "registered_model_name": None},
        "evaluate": {"num_importance_samples": 4, "num_image_rows": 2, "fid": False,
                     "latent_scatter": "none"},
        "cluster": {"submit": True},
    }
    import yaml

    (repo / "params.yaml").write_text(yaml.safe_dump(values))
    tuned = stage(repo, team, "tune", "--only-if-used")
    assert tuned.returncode == 0, tuned.stdout[-3000:] + tuned.stderr[-3000:]
    assert "[submit] job vae-tune-" in tuned.stdout + tuned.stderr
    best = yaml.safe_load((repo / "reports/tune/best_params.yaml").read_text())
    assert (repo / "reports/tune/trials.csv").read_text().count("\n") == 3  # header + 2 trials

    (repo / "pipeline" / "NOTES.txt").write_text("the workspace changed between the jobs\n")
    trained = stage(repo, team, "train")
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    config = json.loads((repo / "models/vae/model_config.json").read_text())
    assert config["latent_dim"] == best["params"]["latent_dim"]
    metrics = json.loads((repo / "reports/train_metrics.json").read_text())
    assert metrics["epochs"] == 2

    evaluated = stage(repo, team, "evaluate")
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert json.loads((repo / "reports/metrics.json").read_text())["num_test_images"] == COUNTS["test"]
    logs = trained.stdout + trained.stderr
    job = re.search(r"\[submit\] job (vae-train-\S+) on", logs).group(1)
    assert "python -m pipeline.train --params s3://" in job_info_entrypoint(team, job)
    assert not list(repo.glob(".submit-*"))  # the staging folder is gone

    fetch = [sys.executable, "-m", "pipeline.jobs", "fetch", "--params", "params.yaml", "--to",
             str(tmp_path / "fetched")]
    fetched = subprocess.run(fetch, cwd=repo, env=team.subprocess_env(), capture_output=True, text=True,
                             timeout=300)
    assert fetched.returncode == 0, fetched.stderr[-3000:]
    for name in ("reports/tune/best_params.yaml", "models/vae/model.safetensors"):
        assert (tmp_path / "fetched" / name).read_bytes() == (repo / name).read_bytes(), name


def job_info_entrypoint(team, submission_id: str) -> str:
    from tests.cluster_helpers import job_info

    return job_info(team, submission_id)["entrypoint"]


def test_a_stage_job_running_stopped_or_failed_leaves_the_workspace_as_it_was(team, workdir, tmp_path):
    """The same stage submitted while its job runs is refused with the job's id; the job stopped with `ray job
    stop` makes the stage fail with the id and what to do, and the workspace's outputs stay as they were."""
    import yaml

    repo = tmp_path / "clone"
    shutil.copytree(workdir, repo)
    write_manifest(write_square_arrays(repo / "data" / "processed" / "fashion_mnist", COUNTS, 220))
    (repo / "params.yaml").write_text(yaml.safe_dump({
        "data": {"dataset": "fashion_mnist"},
        "model": {"architecture": "mlp", "hidden_dims": [64], "latent_dim": 4, "likelihood": "bernoulli"},
        "train": {"epochs": 30, "batch_size": BATCH, "num_workers": 2, "run_name": "stopped",
                  "storage_path": f"{team.bucket_uri}/runs", "max_failures": 0},
        "mlflow": {"experiment_name": "team", "registered_model_name": None},
        "cluster": {"submit": True},
    }))
    (repo / "models/vae").mkdir(parents=True)
    (repo / "models/vae/model.safetensors").write_bytes(b"the previous model")
    first = stage(repo, team, "train", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        seen = ""
        while "[train] epoch 1/" not in seen:
            line = first.stdout.readline()
            assert line, seen[-3000:]
            seen += line
        job = re.search(r"\[submit\] job (vae-train-\S+) on", seen).group(1)
        again = stage(repo, team, "train")
        assert again.returncode == 1
        assert f"already running on {team.dashboard_url}: {job}" in again.stderr
        assert f"ray job stop {job}" in again.stderr
        stopped = subprocess.run([str(Path(sys.executable).with_name("ray")), "job", "stop", job],
                                 env=team.subprocess_env(), capture_output=True, text=True, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        rest, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1
    assert f"job {job} stopped" in rest and "as they were" in rest
    assert (repo / "models/vae/model.safetensors").read_bytes() == b"the previous model"
    assert not list(repo.glob(".submit-*"))
