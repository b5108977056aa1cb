"""The submitting side of `cluster.submit` through object storage (pipeline/submit.py), without a cluster:
what the stage does when the connection to the cluster breaks or it is interrupted (the job goes on, the
message says how to follow or stop it), when the same job is already running, and how the job's outputs
replace the workspace's (all or nothing). The whole flow against a real cluster: tests/test_team_deployment.py
and tests/test_dvc_team_cluster.py."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline import job_submission as jobs
from pipeline import submit
from pipeline.job_submission import SubmitError


@dataclasses.dataclass
class Job:
    submission_id: str
    status: str
    metadata: dict
    message: str = ""


class FakeClient:
    """The part of Ray's JobSubmissionClient the stage uses."""

    def __init__(self, jobs=(), tail=None, final="SUCCEEDED"):
        self.jobs, self.tail, self.final = list(jobs), tail, final

    def list_jobs(self):
        return self.jobs

    async def tail_job_logs(self, job_id):
        for item in self.tail or []:
            if isinstance(item, BaseException):
                raise item
            yield item

    def get_job_info(self, job_id):
        return Job(job_id, self.final, {}, "the driver exited with code 1")


ADDRESS = "http://10.0.0.1:8265"


@pytest.mark.parametrize("failure", [ConnectionError("Cannot connect to host"), KeyboardInterrupt()],
                         ids=["connection-lost", "interrupted"])
def test_a_lost_connection_or_ctrl_c_leaves_the_job_running_and_says_how_to_follow_it(failure, capsys):
    client = FakeClient(tail=["[train] epoch 1/5\n", failure])
    with pytest.raises(SubmitError) as raised:
        jobs.follow(client, "vae-train-abc", ADDRESS)
    message = str(raised.value)
    assert "[train] epoch 1/5" in capsys.readouterr().out
    assert "vae-train-abc goes on" in message or "the job goes on there" in message
    for command in ("ray job logs -f vae-train-abc", "ray job stop vae-train-abc", f"--address {ADDRESS}"):
        assert command in message
    assert "as they were" in message


def test_the_job_is_followed_to_its_end():
    assert jobs.follow(FakeClient(tail=["a\n", "b\n"], final="STOPPED"), "j", ADDRESS).status == "STOPPED"


def test_the_same_job_is_not_submitted_twice_while_it_runs():
    key = "0123456789ab"
    finished = Job("vae-train-old", "SUCCEEDED", {"vae_submission": key})
    other = Job("vae-train-other", "RUNNING", {"vae_submission": "ffffffffffff"})
    jobs.refuse_if_running(FakeClient([finished, other]), "pipeline.train", key, ADDRESS)  # no error
    running = Job("vae-train-now", "RUNNING", {"vae_submission": key})
    with pytest.raises(SubmitError, match="already running on .*: vae-train-now. Not submitting it twice"):
        jobs.refuse_if_running(FakeClient([finished, running]), "pipeline.train", key, ADDRESS)


def _workspace(root: Path) -> None:
    (root / "models/vae").mkdir(parents=True)
    (root / "models/vae/model.safetensors").write_bytes(b"old model")
    (root / "reports").mkdir()
    (root / "reports/train_metrics.json").write_text('{"old": true}')


def test_the_jobs_outputs_replace_the_workspaces_all_or_nothing(tmp_path, monkeypatch):
    workspace, outputs = tmp_path / "workspace", tmp_path / "outputs"
    _workspace(workspace)
    monkeypatch.setenv("VAE_PROJECT_ROOT", str(workspace))
    (outputs / "models/vae").mkdir(parents=True)
    (outputs / "models/vae/model.safetensors").write_bytes(b"new model")
    (outputs / "reports").mkdir()
    (outputs / "reports/train_metrics.json").write_text('{"new": true}')
    # train_curves.csv is declared but missing: nothing may change
    with pytest.raises(SubmitError, match="left no reports/train_curves.csv"):
        jobs.bring_back(jobs.STAGE_FILES["pipeline.train"][1], str(outputs), None)
    assert (workspace / "models/vae/model.safetensors").read_bytes() == b"old model"
    assert (workspace / "reports/train_metrics.json").read_text() == '{"old": true}'

    (outputs / "reports/train_curves.csv").write_text("epoch\n1\n")
    files = jobs.bring_back(jobs.STAGE_FILES["pipeline.train"][1], str(outputs), None)
    assert sorted(files) == ["models/vae/model.safetensors", "reports/train_curves.csv",
                             "reports/train_metrics.json"]
    assert (workspace / "models/vae/model.safetensors").read_bytes() == b"new model"
    assert (workspace / "reports/train_metrics.json").read_text() == '{"new": true}'
    assert not list(workspace.glob(".submit-*"))


def test_without_a_shared_folder_or_a_bucket_the_stage_says_what_to_set(tmp_path):
    from pipeline.params_file import load_params
    from tests.cluster_helpers import write_params

    params = load_params(write_params(tmp_path / "params.yaml", {"cluster.submit": True}))
    with pytest.raises(SubmitError, match="set train.storage_path to a bucket"):
        submit.submit_stage("pipeline.train", params, None)


def test_a_sweep_that_ran_elsewhere_reaches_the_job_only_if_the_workspace_holds_that_sweeps_result(
        tmp_path, monkeypatch):
    """The tune stage ran here (or with another storage path); the train job reads the sweep's best values
    from the storage folder of the sweep its params name: the stage puts the workspace's result there - and
    refuses one that names another sweep (stale), rather than train with it."""
    import yaml

    from pipeline import artifacts
    from pipeline.params_file import load_params
    from tests.cluster_helpers import write_params
    from tests.fixtures.arrays import write_manifest, write_square_arrays

    monkeypatch.setenv("VAE_PROJECT_ROOT", str(tmp_path))
    write_manifest(write_square_arrays(tmp_path / "data/processed/fashion_mnist",
                                       {"train": 64, "valid": 16, "test": 16}, 28))
    params = load_params(write_params(tmp_path / "params.yaml", {
        "data.dataset": "fashion_mnist", "train.use_best_params": True, "cluster.submit": True,
        "train.storage_path": str(tmp_path / "store")}))
    local = tmp_path / "reports/tune/best_params.yaml"
    local.parent.mkdir(parents=True)
    sweep_here = artifacts.sweep_location(params).rsplit("/", 1)[-1]
    local.write_text(yaml.safe_dump({"sweep": "an-older-sweep-0000", "params": {"latent_dim": 8}}))
    with pytest.raises(SubmitError, match="holds the result of sweep an-older-sweep-0000.*dvc repro tune"):
        submit.job_params("pipeline.train", params)

    local.write_text(yaml.safe_dump({"sweep": sweep_here, "params": {"latent_dim": 8}}))
    submit.job_params("pipeline.train", params)
    published = submit.published_data(params)
    stored = Path(artifacts.sweep_location(published)) / "outputs/reports/tune/best_params.yaml"
    assert stored.read_bytes() == local.read_bytes()
    stored.write_text(yaml.safe_dump({"sweep": "the-one-in-storage", "params": {"latent_dim": 16}}))
    submit.job_params("pipeline.train", params)  # a result already there is kept
    assert yaml.safe_load(stored.read_text())["sweep"] == "the-one-in-storage"


def _raw_workspace(root: Path) -> Path:
    raw = root / "data/raw/fashion_mnist"
    (raw / "extracted").mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "sources.json"):
        (raw / name).write_bytes(f"the bytes of {name}".encode())
    (raw / "extracted/image.png").write_bytes(b"not handed on")
    return raw


def _data_params(root: Path, **overrides):
    from pipeline.params_file import load_params
    from tests.cluster_helpers import write_params

    return load_params(write_params(root / "params.yaml", {
        "data.dataset": "fashion_mnist", "train.storage_path": str(root / "store"), **overrides}))


def test_a_submitted_preprocess_fetches_the_raw_files_published_once_and_verified(tmp_path, monkeypatch):
    """The raw files (not the extracted subfolder) go to storage under the hash of their content, once; the
    job fetches each checked against its sha256 - a damaged copy is refused, not preprocessed."""
    laptop, job = tmp_path / "laptop", tmp_path / "job"
    raw = _raw_workspace(laptop)
    monkeypatch.setenv("VAE_PROJECT_ROOT", str(laptop))
    params = _data_params(laptop)
    with pytest.raises(SubmitError, match="run the download stage first"):
        jobs.published_inputs("pipeline.preprocess", _data_params(laptop, **{"data.dataset": "mnist"}))
    inputs = jobs.published_inputs("pipeline.preprocess", params)
    ((folder, entry),) = inputs.items()
    assert folder == "data/raw/fashion_mnist"
    assert sorted(entry["files"]) == sorted(p.name for p in raw.iterdir() if p.is_file())
    assert len(entry["files"]) == 3
    uploads = []
    monkeypatch.setattr(jobs.storage, "upload_file", lambda *a, **k: uploads.append(a))
    assert jobs.published_inputs("pipeline.preprocess", params) == inputs and uploads == []  # already there

    monkeypatch.setenv("VAE_PROJECT_ROOT", str(job))
    jobs.fetch_inputs(inputs, None)
    for name in entry["files"]:
        assert (job / folder / name).read_bytes() == (raw / name).read_bytes()
    assert not (job / folder / "extracted").exists()
    (Path(entry["location"]) / "sources.json").write_bytes(b"changed in the store")
    (job / folder / "sources.json").unlink()
    with pytest.raises(jobs.storage.StorageError, match="sha256"):
        jobs.fetch_inputs(inputs, None)
    assert not (job / folder / "sources.json").exists()


class RecordingClient(FakeClient):
    """A cluster whose 'job' leaves ``files`` in the outputs folder it was given, as a submitted stage
    does."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__()
        self.files, self.submitted = files, {}

    def submit_job(self, **kwargs):
        self.submitted = kwargs
        outputs = Path(kwargs["runtime_env"]["env_vars"][jobs.SUBMISSION_OUTPUTS_ENV])
        for name, data in self.files.items():
            (outputs / name).parent.mkdir(parents=True, exist_ok=True)
            (outputs / name).write_bytes(data)


def test_a_data_stage_job_asks_for_a_cpu_and_its_outputs_land_in_the_workspace(tmp_path, monkeypatch):
    """A data stage works in the job's driver: it asks for one CPU (so Ray places it on a worker host, not on
    a head without CPUs), carries the published inputs in its environment, and its outputs replace the
    workspace's."""
    import ray.job_submission

    monkeypatch.setenv("VAE_PROJECT_ROOT", str(tmp_path))
    _raw_workspace(tmp_path)
    params = _data_params(tmp_path)
    client = RecordingClient({"data/processed/fashion_mnist/manifest.json": b"{}"})
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address: client)
    inputs = jobs.published_inputs("pipeline.preprocess", params)
    uri, key = jobs.write_job_params("pipeline.preprocess", params)
    assert jobs.submit_job("pipeline.preprocess", params, uri, key, ADDRESS, inputs) == 0
    assert client.submitted["entrypoint_num_cpus"] == 1
    assert client.submitted["entrypoint"] == f"python -m pipeline.preprocess --params {uri}"
    env = client.submitted["runtime_env"]["env_vars"]
    assert json.loads(env[jobs.SUBMISSION_INPUTS_ENV]) == inputs
    assert (tmp_path / "data/processed/fashion_mnist/manifest.json").read_bytes() == b"{}"

    train = RecordingClient({name: b"x" for name in jobs.STAGE_FILES["pipeline.train"][1]})
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", lambda address: train)
    jobs.submit_job("pipeline.train", params, uri, key, ADDRESS)
    assert train.submitted["entrypoint_num_cpus"] is None  # a train driver only coordinates, on the head


def test_inside_a_download_job_only_the_raw_files_are_uploaded(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_PROJECT_ROOT", str(tmp_path))
    monkeypatch.setenv("VAE_SUBMITTED", "1")
    monkeypatch.setenv(jobs.SUBMISSION_OUTPUTS_ENV, str(tmp_path / "outputs"))
    jobs.run_here("pipeline.download", _data_params(tmp_path), lambda params: _raw_workspace(tmp_path))
    sent = sorted(p.relative_to(tmp_path / "outputs").as_posix() for p in (tmp_path / "outputs").rglob("*")
                  if p.is_file())
    assert sent == [f"data/raw/fashion_mnist/{name}" for name in
                    ("sources.json", "t10k-images-idx3-ubyte.gz", "train-images-idx3-ubyte.gz")]
