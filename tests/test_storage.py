"""Object storage (pipeline/storage.py) against a real S3 endpoint on 127.0.0.1 (moto's server, signatures
checked): the node-local data cache, publishing, clear errors for a wrong endpoint / bucket / credentials,
params and stage outputs on the store, and the lineage a submission carries."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline import artifacts, storage
from pipeline.common import StageError
from pipeline.config import ConfigError, Params
from pipeline.data import dataset_folder, load_split, location_hashes
from pipeline.params_file import load_params
from tests.fixtures.arrays import write_manifest, write_square_arrays

COUNTS = {"train": 40, "valid": 8, "test": 8}


def published(s3, tmp_path: Path) -> tuple[str, Path]:
    """A tiny dataset built locally and published to a fresh prefix; returns (its URI, the local folder)."""
    local = write_square_arrays(tmp_path / "built" / "fashion_mnist", COUNTS, 200)
    write_manifest(local)
    location = f"{s3.prefix()}/processed/fashion_mnist"
    storage.publish_dataset(local, location)
    return location, local


def test_a_node_caches_the_dataset_verifies_it_and_reuses_it(s3, tmp_path, monkeypatch):
    location, local = published(s3, tmp_path)
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "node-a"))
    folder = dataset_folder(location)
    assert folder.is_relative_to(tmp_path / "node-a")
    split = load_split(folder, "train", verify=True)
    np.testing.assert_array_equal(split.images, np.load(local / "train_images.npy"))

    # A second run on the same node downloads nothing.
    def no_download(*args, **kwargs):
        raise AssertionError("the cache was not reused")

    monkeypatch.setattr(storage, "download_file", no_download)
    assert dataset_folder(location) == folder
    monkeypatch.undo()
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "node-a"))
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)

    # A corrupted cached array is detected and fetched again.
    cached = folder / "valid_images.npy"
    damaged = bytearray(cached.read_bytes())
    damaged[-1] ^= 0xFF
    cached.write_bytes(bytes(damaged))
    assert dataset_folder(location) == folder
    assert cached.read_bytes() == (local / "valid_images.npy").read_bytes()

    # Another node has its own cache.
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "node-b"))
    assert dataset_folder(location).is_relative_to(tmp_path / "node-b")


def test_workers_of_one_node_fill_its_cache_once(s3, tmp_path, monkeypatch):
    """Several Train workers on one node ask for the dataset at the same time: one downloads each array, the
    others wait for it and reuse the verified copy."""
    import threading

    location, local = published(s3, tmp_path)
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "node"))
    downloads = []
    real = storage.download_file

    def slow_download(source, target, *args, **kwargs):
        downloads.append(source)
        time.sleep(0.2)  # long enough for the other workers to look at the cache meanwhile
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(storage, "download_file", slow_download)
    folders = []
    workers = [threading.Thread(target=lambda: folders.append(dataset_folder(location))) for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(folders) == 3 and len(set(folders)) == 1
    assert sorted(downloads) == sorted(set(downloads)) and len(downloads) == 3  # each array once
    for split in COUNTS:
        name = f"{split}_images.npy"
        assert (folders[0] / name).read_bytes() == (local / name).read_bytes()


def test_a_damaged_object_in_the_store_is_refused_and_never_cached(s3, tmp_path, monkeypatch):
    location, local = published(s3, tmp_path)
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "node"))
    digest = storage.manifest_files(json.loads((local / "manifest.json").read_text()))["test_images.npy"]
    damaged = storage.join(location, storage.array_key("test_images.npy", digest))  # where it was published
    bucket, key = damaged[len("s3://"):].split("/", 1)
    s3.client().put_object(Bucket=bucket, Key=key, Body=b"not the array the manifest lists")
    with pytest.raises(storage.StorageError, match="sha256 .* differs from the manifest"):
        dataset_folder(location)
    folder = storage.cache_folder(location)
    assert not (folder / "test_images.npy").exists()
    assert not (folder / "manifest.json").exists()
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_reader_during_a_publish_gets_the_old_or_the_new_dataset_never_a_mix(s3, tmp_path, monkeypatch):
    """Re-publishing to the same prefix: a node that reads while the new arrays go up gets the old dataset,
    whole and verified; once the manifest is replaced, the new one; the old arrays are removed after that."""
    location, old = published(s3, tmp_path)
    new = write_square_arrays(tmp_path / "rebuilt" / "fashion_mnist", COUNTS, 90)  # other content
    write_manifest(new)
    during = {}
    real_upload = storage.upload_file

    def upload_then_read(source, target, endpoint=None):
        real_upload(source, target, endpoint)
        if Path(source).name == "train_images.npy":  # a new array is up, the old manifest still there
            monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "node-during"))
            during["folder"] = dataset_folder(location)

    monkeypatch.setattr(storage, "upload_file", upload_then_read)
    storage.publish_dataset(new, location)
    for split in COUNTS:
        name = f"{split}_images.npy"
        assert (during["folder"] / name).read_bytes() == (old / name).read_bytes()
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "node-after"))
    after = dataset_folder(location)
    for split in COUNTS:
        name = f"{split}_images.npy"
        assert (after / name).read_bytes() == (new / name).read_bytes()
    digests = storage.manifest_files(json.loads((new / "manifest.json").read_text()))
    assert sorted(storage.list_files(storage.join(location, storage.ARRAYS))) == sorted(
        storage.array_key(name, digest).removeprefix("arrays/") for name, digest in digests.items())

    # A reader that read the manifest just before a publish replaced it and removed its arrays reads again.
    monkeypatch.setattr(storage, "upload_file", real_upload)
    real_read, republished = storage.read_bytes, []

    def read_then_publish(source, *args, **kwargs):
        data = real_read(source, *args, **kwargs)
        if source.endswith(storage.MANIFEST) and not republished:
            republished.append(True)
            storage.publish_dataset(old, location)  # the old content again, its arrays anew
        return data

    monkeypatch.setattr(storage, "read_bytes", read_then_publish)
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "node-racing"))
    racing = dataset_folder(location)
    assert republished
    assert (racing / "train_images.npy").read_bytes() == (old / "train_images.npy").read_bytes()


def test_an_interrupted_publish_is_not_taken_as_data(s3, tmp_path, monkeypatch):
    local = write_square_arrays(tmp_path / "built" / "fashion_mnist", COUNTS, 200)
    write_manifest(local)
    location = f"{s3.prefix()}/processed/fashion_mnist"
    uploaded = []
    real_upload = storage.upload_file

    def upload_then_fail(source, target, endpoint=None):
        if len(uploaded) == 2:
            raise OSError("connection reset")
        real_upload(source, target, endpoint)
        uploaded.append(Path(source).name)

    monkeypatch.setattr(storage, "upload_file", upload_then_fail)
    with pytest.raises(OSError):
        storage.publish_dataset(local, location)
    assert "manifest.json" not in uploaded
    monkeypatch.undo()
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    with pytest.raises(FileNotFoundError, match="publish the preprocessed data"):
        dataset_folder(location)
    assert location_hashes(location) == {}


def poisoned_manifest(s3, location: str, local: Path, name: str, payload: bytes) -> None:
    """Rewrite the published manifest.json so that it lists ``name`` too, with the sha256 of ``payload``,
    which is stored under every key the cache would fetch it from: only the name check can stop it."""
    digest = hashlib.sha256(payload).hexdigest()
    manifest = json.loads((local / "manifest.json").read_text())
    manifest["splits"]["zz"] = {"count": 1, "files": {name: digest}}
    bucket = location[len("s3://"):].split("/", 1)[0]
    for key in (storage.array_key(name, digest), name):
        uri = storage.join(location, key)
        s3.client().put_object(Bucket=bucket, Key=uri[len(f"s3://{bucket}/"):], Body=payload)
    s3.client().put_object(Bucket=bucket, Key=storage.join(location, "manifest.json")[len(f"s3://{bucket}/"):],
                           Body=json.dumps(manifest).encode())


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "inner-dotdot", "symlinked-folder", "symlinked-file"])
def test_a_manifest_naming_a_file_outside_the_cache_is_refused_before_anything_is_written(
        s3, tmp_path, monkeypatch, kind):
    """Write access to the bucket is not code execution on the nodes: a manifest whose array names lead out
    of the node's cache folder (an absolute path, ``..``, a symlink planted in the cache) is refused whole,
    before a single array is fetched."""
    location, local = published(s3, tmp_path)
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "node"))
    folder = storage.cache_folder(location)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.npy"
    victim.write_bytes(b"a file of the node's user")
    name, landing = {
        "absolute": (str(outside / "abs.npy"), outside / "abs.npy"),
        "dotdot": ("../escaped.npy", folder.parent / "escaped.npy"),
        "inner-dotdot": ("a/../../escaped.npy", folder.parent / "escaped.npy"),
        "symlinked-folder": ("zlinked/escaped.npy", outside / "escaped.npy"),  # sorts after the real arrays
        "symlinked-file": ("zvictim.npy", victim),
    }[kind]
    folder.mkdir(parents=True)
    if kind == "symlinked-folder":
        (folder / "zlinked").symlink_to(outside, target_is_directory=True)
    elif kind == "symlinked-file":
        (folder / "zvictim.npy").symlink_to(victim)
    poisoned_manifest(s3, location, local, name, b"import os; os.system('echo owned')\n")

    with pytest.raises(storage.StorageError) as raised:
        storage.local_dataset(location)
    message = str(raised.value)
    assert repr(name) in message and location in message and str(folder) in message
    assert "python -m pipeline.preprocess" in message
    assert landing == victim or not landing.exists()
    assert victim.read_bytes() == b"a file of the node's user"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.npy"]
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name, folder.name + ".lock"]
    # Not even the genuine arrays were fetched (the symlinked names sort after them).
    assert not [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.parametrize("name, reason", [
    ("/tmp/x", "an absolute path"), ("../x", "a '..'"), ("a/../../x", "a '..'"), ("./a", "'.'"),
    ("a//b", "empty path component"), ("", "an empty name"), ("a\\..\\..\\x", "a backslash"),
    ("a\x00b", "a NUL byte"),
])
def test_names_that_are_not_plain_relative_paths_are_refused_saying_why(tmp_path, name, reason):
    with pytest.raises(storage.StorageError, match="would be written outside") as raised:
        storage.safe_member_path(tmp_path, name)
    assert repr(name) in str(raised.value) and str(tmp_path) in str(raised.value)
    assert reason in str(raised.value)
    assert storage.safe_member_path(tmp_path, "train_images.npy") == tmp_path / "train_images.npy"
    assert storage.safe_member_path(tmp_path, "models/vae/run.json") == tmp_path / "models/vae/run.json"


def test_fetching_a_tree_refuses_keys_that_leave_the_destination_and_writes_nothing(s3, tmp_path):
    """`python -m pipeline.jobs fetch` copies a run's outputs/ into the workspace: a listed key with ``..``
    components would write over any file of the user (a shell profile, the virtual environment)."""
    location = f"{s3.prefix()}/runs/vae-1/outputs"
    bucket, prefix = location[len("s3://"):].split("/", 1)
    bad = "reports/../../../escaped.txt"  # listed after models/: every key is checked before any is fetched
    for key in ("models/vae/run.json", bad, "reports/train_metrics.json", "zz/../../escaped.txt"):
        s3.client().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=b"{}")
    assert bad in storage.list_files(location)  # the store keeps the key as it is
    root = tmp_path / "workspace" / "project"
    root.mkdir(parents=True)
    with pytest.raises(storage.StorageError, match=re.escape(f"{bad!r} would be written outside")) as raised:
        storage.download_tree(location, root)
    assert storage.join(location, bad) in str(raised.value) and "delete that object" in str(raised.value)
    assert not (tmp_path / "escaped.txt").exists() and not list(tmp_path.rglob("escaped.txt"))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # the good keys were not fetched either


@pytest.mark.parametrize(
    "case, expected",
    [
        ("endpoint", "no S3 endpoint answers at http://127.0.0.1:9"),
        ("bucket", "bucket 'no-such-bucket' does not exist"),
        ("key", "refused the credentials"),
        ("secret", "refused the credentials"),
    ],
)
def test_bad_storage_settings_fail_within_seconds_naming_the_fix(s3, monkeypatch, case, expected):
    location = f"{s3.prefix()}/runs"
    if case == "endpoint":
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    elif case == "bucket":
        location = "s3://no-such-bucket/runs"
    elif case == "key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG")
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    started = time.monotonic()
    with pytest.raises(storage.StorageError, match=expected) as raised:
        storage.check_location(location, what="train.storage_path")
    assert time.monotonic() - started < 10
    assert s3.secret_key not in str(raised.value)
    assert "train.storage_path" in str(raised.value)


def test_the_endpoint_setting_wins_over_the_environment(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    location = f"{s3.prefix()}/x.txt"
    storage.write_bytes(location, b"hello", endpoint=s3.endpoint)
    assert storage.read_bytes(location, endpoint=s3.endpoint) == b"hello"
    with pytest.raises(storage.StorageError, match="no S3 endpoint answers"):
        storage.read_bytes(location, patient=False)


def test_params_are_read_from_the_object_store(s3, tmp_path):
    location = f"{s3.prefix()}/params/train.yaml"
    storage.write_bytes(location, b"train:\n  epochs: 3\ndata:\n  dataset: mnist\n")
    params = load_params(location)
    assert (params.train.epochs, params.data.dataset) == (3, "mnist")
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(f"{s3.prefix()}/params/missing.yaml")


def test_a_processed_dir_uri_is_a_location_not_a_local_path():
    params = Params.model_validate({"data": {"processed_dir": "s3://vae/processed/", "dataset": "mnist"}})
    assert params.data.processed_location() == "s3://vae/processed/mnist"
    with pytest.raises(ValueError, match="is a URI"):
        params.data.processed_path()


def stage_params(s3, tmp_path) -> Params:
    location, _ = published(s3, tmp_path)
    processed = location.rsplit("/", 1)[0]
    return Params.model_validate({
        "data": {"dataset": "fashion_mnist", "processed_dir": processed},
        "model": {"architecture": "mlp", "hidden_dims": [16], "latent_dim": 2, "likelihood": "bernoulli"},
        "train": {"storage_path": f"{processed.rsplit('/', 1)[0]}/runs", "run_name": "outputs"},
    })


def fake_training(root: Path, monkeypatch, name: str) -> None:
    """Write a real model folder and the train reports in the project root ``root``, as the train stage."""
    from pipeline.train_plan import build_model

    monkeypatch.setenv("VAE_PROJECT_ROOT", str(root))
    model = build_model(Params().model.model_copy(update={"architecture": "mlp", "hidden_dims": [16],
                                                          "latent_dim": 2, "likelihood": "bernoulli"}),
                        (1, 28, 28))
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "model_config": model.config,
             "params": {}, "history": [{"epoch": 1, "val_negative_elbo": 500.0}], "epoch": 1, "step": 5}
    artifacts.write_training_outputs(state, name, "run-id-1")


def test_a_stage_finds_the_run_outputs_in_storage_wherever_it_runs(s3, tmp_path, monkeypatch):
    params = stage_params(s3, tmp_path)
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "cache"))
    name = artifacts.run_location(params).rsplit("/", 1)[-1]
    fake_training(tmp_path / "job-a", monkeypatch, name)
    saved = artifacts.save_stage_outputs(
        params, name, [artifacts.MODEL_DIR, artifacts.TRAIN_METRICS_PATH, artifacts.TRAIN_CURVES_PATH])
    assert saved == f"{artifacts.run_location(params)}/outputs"

    # Another job's working folder: no models/ at all -> the run's own copy from storage.
    monkeypatch.setenv("VAE_PROJECT_ROOT", str(tmp_path / "job-b"))
    found = artifacts.model_dir_for(params)
    assert found != tmp_path / "job-b" / "models" / "vae"
    assert (found / "model.safetensors").read_bytes() == (
        tmp_path / "job-a" / "models" / "vae" / "model.safetensors").read_bytes()
    assert artifacts.load_trained_model(found).latent_dim == 2

    # A stale model of another run in the workspace does not shadow this run's.
    fake_training(tmp_path / "job-b", monkeypatch, "some-other-run")
    assert artifacts.model_dir_for(params) == found

    # The workspace's model of this very run (the DVC pipeline) is used as it is.
    fake_training(tmp_path / "job-c", monkeypatch, name)
    assert artifacts.model_dir_for(params) == tmp_path / "job-c" / "models" / "vae"

    # Bring everything back.
    sources, files = artifacts.fetch_stage_outputs(params, tmp_path / "back")
    assert sources == [saved]  # no sweep: train.use_best_params is false
    assert set(files) >= {"models/vae/model.safetensors", "reports/train_metrics.json"}
    assert json.loads((tmp_path / "back" / "models" / "vae" / "run.json").read_text())["run_name"] == name


def test_the_pictures_task_reads_the_data_through_the_cache_of_its_own_node(s3, tmp_path, monkeypatch):
    """The evaluate stage's pictures-and-FID work may run as a Ray task on another node than the driver: it
    gets the data's location (not the driver's node-local cache path) and reads through its own node's
    cache."""
    from pipeline import evaluate

    params = stage_params(s3, tmp_path)
    params = params.model_copy(update={"evaluate": params.evaluate.model_copy(
        update={"fid": False, "num_image_rows": 2, "max_images": 8, "latent_scatter": "none"})})
    name = artifacts.run_location(params).rsplit("/", 1)[-1]
    fake_training(tmp_path / "job", monkeypatch, name)
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "driver-node"))
    handed = []

    def task(*args):
        handed.append(args)
        raise KeyboardInterrupt  # stop the stage here: what the task was given is what matters

    monkeypatch.setattr(evaluate, "_pictures_and_fid", task)
    with pytest.raises(KeyboardInterrupt):
        evaluate.evaluate(params)
    location = handed[0][3]
    assert location == params.data.processed_location() and location.startswith("s3://")

    monkeypatch.undo()
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("VAE_PROJECT_ROOT", str(tmp_path / "job"))
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "other-node"))  # a node that never saw the data
    model = artifacts.load_trained_model(tmp_path / "job" / "models" / "vae")
    figures, pictures = evaluate._pictures_and_fid(*handed[0][:2], model.state_dict(), location)
    assert pictures["reconstructions"].shape[1:] == (1, 28, 28)
    assert (tmp_path / "other-node").is_dir()  # read through this node's own cache


def test_no_model_anywhere_names_both_places(s3, tmp_path, monkeypatch):
    params = stage_params(s3, tmp_path)
    monkeypatch.setenv("VAE_PROJECT_ROOT", str(tmp_path / "empty"))
    with pytest.raises(StageError, match=r"model.safetensors is missing and the run's storage has no model "
                                         r"\(s3://.*/outputs\)"):
        artifacts.model_dir_for(params)
    with pytest.raises(StageError, match="no stage outputs in s3://"):
        artifacts.fetch_stage_outputs(params, tmp_path / "back")


def test_ray_train_gets_an_s3_filesystem_with_the_endpoint_setting(s3, monkeypatch):
    from pipeline.ray_runtime import run_storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # cluster.s3_endpoint_url wins
    params = Params.model_validate({"cluster": {"s3_endpoint_url": s3.endpoint}})
    location = f"{s3.prefix()}/runs"
    config = run_storage(location, params)
    assert config["storage_path"] == location[len("s3://"):]
    with config["storage_filesystem"].open_output_stream(f"{config['storage_path']}/probe") as handle:
        handle.write(b"checkpoint bytes")
    bucket, key = f"{config['storage_path']}/probe".split("/", 1)
    assert s3.client().get_object(Bucket=bucket, Key=key)["Body"].read() == b"checkpoint bytes"
    assert run_storage("/tmp/runs", params) == {"storage_path": "/tmp/runs"}


def test_a_resumed_run_on_object_storage_continues_its_mlflow_run(s3, tmp_path, monkeypatch):
    from pipeline.tracking import open_training_run

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    params = Params.model_validate({"mlflow": {"experiment_name": "resume-on-s3"}})
    run_folder = f"{s3.prefix()}/runs/vae-1234"
    first, _ = open_training_run(params, "vae-1234", run_folder, {})
    again, _ = open_training_run(params, "vae-1234", run_folder, {})
    assert again == first
    other, _ = open_training_run(params, "vae-1234", f"{s3.prefix()}/runs/vae-1234", {})
    assert other != first


def test_a_submission_carries_the_commit_of_the_submitting_checkout(monkeypatch):
    from pipeline import jobs, tracking

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True, check=True).stdout.strip()
    env = jobs.runtime_env({"EXTRA": "1"})["env_vars"]
    assert env["VAE_GIT_COMMIT"] == head and env["VAE_GIT_DIRTY"] in ("true", "false")
    assert env["EXTRA"] == "1"
    # Inside the job (no .git in Ray's copy of the tree) the submitted values are the lineage.
    monkeypatch.setenv("VAE_GIT_COMMIT", "0123abcd" * 5)
    monkeypatch.setenv("VAE_GIT_DIRTY", "true")
    monkeypatch.setattr(tracking, "REPO_ROOT", Path("/"))
    assert tracking.lineage_tags() == {"git_commit": "0123abcd" * 5, "git_dirty": "true",
                                       "mlflow.source.git.commit": "0123abcd" * 5}
    monkeypatch.delenv("VAE_GIT_COMMIT")
    monkeypatch.delenv("VAE_GIT_DIRTY")
    assert tracking.lineage_tags()["git_commit"] == "unknown"


def test_a_gzip_file_is_stored_as_it_is(s3, tmp_path):
    """A ``.gz`` file (MNIST's raw files) is stored byte for byte and comes back the same: no compression is
    added on the way up nor taken off on the way down."""
    import gzip

    source = tmp_path / "train-images-idx3-ubyte.gz"
    source.write_bytes(gzip.compress(bytes(range(256)) * 64))
    location = f"{s3.prefix()}/{source.name}"
    storage.upload_file(source, location, s3.endpoint)
    fs, path = storage.filesystem(location, s3.endpoint)
    assert fs.get_file_info(path).size == source.stat().st_size
    storage.download_file(location, tmp_path / "back.gz", s3.endpoint, sha256=storage.sha256_file(source))
    assert (tmp_path / "back.gz").read_bytes() == source.read_bytes()
    assert storage.read_bytes(location, s3.endpoint) == source.read_bytes()


def test_a_dataset_larger_than_the_nodes_cache_disk_is_refused_before_a_byte_is_fetched(s3, tmp_path,
                                                                                          monkeypatch):
    """The refusal that says where a node-local copy stops working (README, "Bigger than a node"). The disk's
    free space is the one thing not real here: this machine's disk is far larger than the test's data."""
    location, _ = published(s3, tmp_path)
    monkeypatch.setenv("VAE_DATA_CACHE", str(tmp_path / "small-node"))
    manifest = json.loads(storage.read_bytes(storage.join(location, "manifest.json")))
    count = sum(info["count"] for info in manifest["splits"].values())
    needed = count * int(np.prod(manifest["image_shape"]))
    free = needed - 1
    real_usage = shutil.disk_usage
    monkeypatch.setattr(storage.shutil, "disk_usage",
                        lambda path: real_usage(path)._replace(free=free))
    with pytest.raises(storage.StorageError, match=rf"{count:,} images of .* need .* GB in this node's data "
                       r"cache .*\(784 bytes per image\).*nothing was fetched.*VAE_DATA_CACHE") as refused:
        dataset_folder(location)
    assert "Bigger than a node" in str(refused.value)
    written = [p for p in (tmp_path / "small-node").rglob("*") if p.is_file()]
    assert [p for p in written if not p.name.endswith(".lock")] == []
    free = needed  # exactly enough: fetched
    assert load_split(dataset_folder(location), "train", verify=True).images.shape[1:] == (1, 28, 28)
