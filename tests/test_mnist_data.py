"""The real Fashion-MNIST (Debian's dataset-fashion-mnist, installed by `make system-deps`) through both data
stages, the MNIST-family mirror download over HTTP, and the data loading API of pipeline/data.py."""

from __future__ import annotations

import gzip
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import datasets as ds
from pipeline.common import REPO_ROOT
from pipeline.config import parse_params
from pipeline.data import load_manifest, load_split
from pipeline.datasets import DataStageError
from pipeline.download import download
from pipeline.preprocess import preprocess
from tests.fixtures.repository import fresh_repository, repository_env

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / ds.MNIST_TRAIN_IMAGES).is_file(),
    reason="the real Fashion-MNIST is missing: `make system-deps` (apt-get install dataset-fashion-mnist)")


def mnist_params(tmp_path: Path, **download_section):
    section = {"fashion_mnist_mirrors": [], "retries": 1, "retry_backoff_s": 0.01, "timeout_s": 5}
    section.update(download_section)
    return parse_params({"data": {"dataset": "fashion_mnist", "raw_dir": str(tmp_path / "raw"),
                                  "processed_dir": str(tmp_path / "processed")},
                         "download": section})


def idx_payload(path: Path, header: int) -> bytes:
    return gzip.decompress(path.read_bytes())[header:]


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    """Both stages run on the real Fashion-MNIST from the Debian package (download: the local folder)."""
    if not (DEBIAN_FASHION_MNIST / ds.MNIST_TRAIN_IMAGES).is_file():
        pytest.skip("the real Fashion-MNIST is missing: `make system-deps`")
    tmp_path = tmp_path_factory.mktemp("fashion")
    params = mnist_params(tmp_path)
    download(params.data, params.download)
    manifest = preprocess(params.data, params.preprocess)
    return params, manifest


@needs_fashion_mnist
def test_real_fashion_mnist_arrays_match_the_idx_bytes(fashion):
    params, manifest = fashion
    processed = params.data.processed_path()
    train, valid, test = (load_split(processed, split) for split in ds.SPLITS)
    assert (len(train), len(valid), len(test)) == (55_000, 5_000, 10_000)
    for split in (train, valid, test):
        assert split.images.dtype == np.uint8 and split.images.shape[1:] == (1, 28, 28)
        assert split.labels.dtype == np.uint8 and split.attributes is None and split.attribute_names == []
    # train + valid are the official training set in order, test the official test set: byte for byte.
    raw = DEBIAN_FASHION_MNIST
    assert np.concatenate([train.images, valid.images]).tobytes() == idx_payload(
        raw / ds.MNIST_TRAIN_IMAGES, 16
    )
    assert np.concatenate([train.labels, valid.labels]).tobytes() == idx_payload(
        raw / ds.MNIST_TRAIN_LABELS, 8
    )
    assert test.images.tobytes() == idx_payload(raw / ds.MNIST_TEST_IMAGES, 16)
    assert test.labels.tobytes() == idx_payload(raw / ds.MNIST_TEST_LABELS, 8)
    assert manifest["image_shape"] == [1, 28, 28] and manifest["attribute_names"] == []
    assert {s: manifest["splits"][s]["count"] for s in ds.SPLITS} == {
        "train": 55_000,
        "valid": 5_000,
        "test": 10_000,
    }
    assert "first 55,000" in manifest["preprocess"]["split"]


@needs_fashion_mnist
def test_debian_files_are_accepted_by_the_official_checksum_of_their_content(fashion):
    params, manifest = fashion
    record = json.loads((params.data.raw_path() / "sources.json").read_text())["files"]
    for name, spec in ds.FASHION_MNIST_FILES.items():
        copied = params.data.raw_path() / name
        assert copied.read_bytes() == (DEBIAN_FASHION_MNIST / name).read_bytes()
        assert record[name]["source"] == "local"
        assert spec.content_md5 in record[name]["verified_by"]  # Debian re-compressed the official .gz files
        assert manifest["sources"][name]["md5"] == record[name]["md5"]


@needs_fashion_mnist
def test_mirror_download_over_http_falls_through_to_the_next_mirror(http_server, tmp_path, caplog):
    for name in ds.FASHION_MNIST_FILES:
        http_server.add(f"/mirror-b/{name}", DEBIAN_FASHION_MNIST / name)
    params = mnist_params(
        tmp_path,
        fashion_mnist_local_dir=None,
        fashion_mnist_mirrors=[http_server.url + "/mirror-a/", http_server.url + "/mirror-b"],
    )

    with caplog.at_level(logging.INFO, logger="pipeline.download"):
        download(params.data, params.download)

    failed = [r.getMessage() for r in caplog.records if "mirror-a/ failed" in r.getMessage()]
    assert len(failed) == 4 and all("failed: HTTP 404 for" in line for line in failed), failed
    for name in ds.FASHION_MNIST_FILES:
        assert (params.data.raw_path() / name).read_bytes() == (DEBIAN_FASHION_MNIST / name).read_bytes()


def test_no_mnist_source_gives_the_install_hint(tmp_path):
    params = mnist_params(tmp_path, fashion_mnist_local_dir=str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataStageError) as raised:
        download(params.data, params.download)
    assert "could not get 4 fashion_mnist file(s)" in str(raised.value)
    assert "apt-get install dataset-fashion-mnist" in str(raised.value)


def test_malformed_idx_file_is_reported(tmp_path):
    params = mnist_params(tmp_path)
    raw = params.data.raw_path()
    raw.mkdir(parents=True)
    for name in ds.FASHION_MNIST_FILES:
        (raw / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (1).to_bytes(4, "big") * 3 + b"\x00"))
    (raw / ds.MNIST_TRAIN_LABELS).write_bytes(gzip.compress(b"\x00\x00\x0d\x01junk"))
    with pytest.raises(DataStageError, match=r"not an IDX file of unsigned bytes"):
        preprocess(params.data, params.preprocess)
    assert not params.data.processed_path().exists()


# ------------------------------------------------------------------------------------------ pipeline/data.py


def test_load_split_errors_say_which_stage_to_run(tmp_path, fashion):
    with pytest.raises(FileNotFoundError, match=r"dvc repro preprocess"):
        load_split(tmp_path / "nothing", "train")
    with pytest.raises(FileNotFoundError, match=r"dvc repro preprocess"):
        load_manifest(tmp_path)
    params, _ = fashion
    copy = tmp_path / "copy"
    shutil.copytree(params.data.processed_path(), copy)
    with pytest.raises(ValueError, match="split must be one of"):
        load_split(copy, "validation")
    (copy / "valid_labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"valid_labels.npy is missing; run `dvc repro preprocess`"):
        load_split(copy, "valid")
    data = bytearray((copy / "test_images.npy").read_bytes())
    data[-1] ^= 0xFF
    (copy / "test_images.npy").write_bytes(bytes(data))
    load_split(copy, "test")  # not verified by default: no read of the whole file
    with pytest.raises(ValueError, match="sha256 differs from the manifest"):
        load_split(copy, "test", verify=True)


def test_load_split_memory_maps_by_default(fashion):
    params, _ = fashion
    mapped = load_split(params.data.processed_path(), "valid")
    loaded = load_split(params.data.processed_path(), "valid", mmap=False)
    assert isinstance(mapped.images, np.memmap) and not mapped.images.flags.writeable
    assert not isinstance(loaded.images, np.memmap)
    np.testing.assert_array_equal(mapped.images, loaded.images)


@pytest.mark.parametrize("stage", ["pipeline.download", "pipeline.preprocess"])
def test_data_stages_import_no_torch_ray_or_mlflow(stage):
    """The data stages start fast and do not re-run for model code: they import none of the training stack."""
    code = (
        f"import sys, {stage}; bad = {{'torch', 'ray', 'mlflow', 'dvc'}} & "
        "{m.split('.')[0] for m in sys.modules}; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


# ------------------------------------------------------------------------------------------- dvc repro


@pytest.mark.slow
@needs_fashion_mnist
def test_dvc_repro_preprocess_on_fashion_mnist_in_a_fresh_copy(tmp_path):
    """`dvc repro preprocess` with data.dataset = fashion_mnist in a fresh git + DVC copy of the repository:
    runs both stages, then reports everything up to date and re-runs nothing."""
    if shutil.which("git") is None:
        pytest.skip("git is needed for a DVC repository")
    repo = fresh_repository(tmp_path, {"data.dataset": "fashion_mnist"})
    env = repository_env()

    def run(*command):
        return subprocess.run(
            command, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=True
        )

    run(".venv/bin/dvc", "repro", "preprocess")  # as the README types it: no venv on PATH
    manifest = load_manifest(repo / "data" / "processed" / "fashion_mnist")
    assert manifest["splits"]["valid"]["count"] == 5_000
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert {out["path"] for stage in lock["stages"].values() for out in stage["outs"]} == {
        "data/raw/fashion_mnist",
        "data/processed/fashion_mnist",
    }
    # so `dvc repro preprocess` re-runs nothing (the later stages have not run here)
    assert "up to date" in run(".venv/bin/dvc", "status", "preprocess").stdout
