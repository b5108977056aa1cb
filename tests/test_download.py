"""The download stage against a local HTTP server serving CelebA-layout fixture data: the real download code
(gdown, huggingface_hub, our verification and extraction), pointed at 127.0.0.1 through the URL settings of
the ``download`` section. The fixture's md5 sums differ from the official ones, so each test pins them for the
source that serves them (``download.pinned_md5``), the mechanism a user has for a mirror."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from pathlib import Path

import pytest
import yaml

from benchmarks.celeba_layout import (
    CelebaFixture,
    write_celeba_fixture,
    write_kaggle_archive,
    write_unsafe_zip,
)
from pipeline import datasets as ds
from pipeline.common import REPO_ROOT
from pipeline.config import parse_params
from pipeline.datasets import DataStageError
from pipeline.download import describe_html, download, main
from tests.fixtures.http_server import LOGIN_PAGE, QUOTA_PAGE, VIRUS_SCAN_PAGE, FileServer

HF_REPO = "someone/celeba-mirror"


def make_params(tmp_path: Path, server: FileServer | None = None, **download_section):
    section = {
        "sources": ["gdrive"],
        "local_dir": None,
        "retries": 1,
        "retry_backoff_s": 0.01,
        "timeout_s": 5,
        "huggingface_repo": HF_REPO,
    }
    if server is not None:
        section.update(
            gdrive_url=server.url + "/gdrive/uc?id={file_id}",
            huggingface_endpoint=server.hf_endpoint(),
            kaggle_url=server.url + "/kaggle/{dataset}",
        )
    section.update(download_section)
    return parse_params(
        {
            "data": {
                "dataset": "celeba",
                "raw_dir": str(tmp_path / "raw"),
                "processed_dir": str(tmp_path / "processed"),
            },
            "download": section,
        }
    )


def serve_drive(
    server: FileServer, fixture: CelebaFixture, skip: tuple[str, ...] = (), **zip_options
) -> None:
    for name, spec in ds.CELEBA_FILES.items():
        if name not in skip:
            server.add(
                f"/gdrive/uc?id={spec.gdrive_id}",
                fixture.path(name),
                **(zip_options if name == ds.CELEBA_ZIP else {}),
            )


def serve_hub(server: FileServer, fixture: CelebaFixture, skip: tuple[str, ...] = ()) -> None:
    for name in ds.CELEBA_FILES:
        if name not in skip:
            server.add_hf_file(HF_REPO, name, fixture.path(name))


def target_of(params) -> Path:
    return params.data.raw_path() / ds.CELEBA_FOLDER


def assert_nothing_half_written(params) -> None:
    """Only verified files (and sources.json) in data/raw/celeba; no temporary or partial file anywhere in
    it."""
    raw_root = params.data.raw_path()
    record = (
        json.loads((raw_root / "sources.json").read_text())["files"]
        if (raw_root / "sources.json").exists()
        else {}
    )
    for path in raw_root.rglob("*"):
        relative = path.relative_to(raw_root)
        if path.name != ".source-md5":  # the marker of a completed extraction
            assert not path.name.startswith("."), f"temporary file left behind: {relative}"
        if path.is_file() and path.parent == target_of(params):
            assert path.name in record, f"{relative} is not a verified file"
    staged = params.data.raw_path().parent / ".downloads"
    for path in staged.rglob("*") if staged.exists() else []:
        if path.is_file():
            assert path.suffix == ".part" or ".cache" in path.parts, f"unverified download left: {path}"
            assert not path.read_bytes().lstrip().lower().startswith(b"<!doctype html"), (
                f"HTML page kept: {path}"
            )


def test_clean_download_gives_torchvision_layout(celeba_fixture, http_server, tmp_path):
    serve_drive(http_server, celeba_fixture)
    params = make_params(tmp_path, http_server, pinned_md5=celeba_fixture.pins("gdrive"))

    download(params.data, params.download)

    target = target_of(params)
    for name, md5 in celeba_fixture.md5.items():
        assert (
            ds.CELEBA_FILES[name] and (target / name).read_bytes() == celeba_fixture.path(name).read_bytes()
        ), md5
    images = sorted(p.name for p in (target / ds.CELEBA_IMAGE_FOLDER).glob("*.jpg"))
    assert images == celeba_fixture.names
    with zipfile.ZipFile(celeba_fixture.path(ds.CELEBA_ZIP)) as archive:
        assert (target / ds.CELEBA_IMAGE_FOLDER / "000007.jpg").read_bytes() == archive.read(
            "img_align_celeba/000007.jpg"
        )
    record = json.loads((params.data.raw_path() / "sources.json").read_text())["files"]
    assert {entry["source"] for entry in record.values()} == {"gdrive"}
    assert not (params.data.raw_path().parent / ".downloads" / "celeba").exists(), (
        "staging folder not cleaned"
    )
    assert_nothing_half_written(params)

    # torchvision reads the result as it is (its own md5 check of the .txt files, given the fixture's sums).
    import torchvision

    class FixtureCelebA(torchvision.datasets.CelebA):
        file_list = [
            (i, celeba_fixture.md5[name], name) for i, _, name in torchvision.datasets.CelebA.file_list
        ]

    dataset = FixtureCelebA(str(params.data.raw_path()), split="valid", target_type=["attr", "identity"])
    assert len(dataset) == 5
    image, (attributes, identity) = dataset[0]
    first = celeba_fixture.split_names("valid")[0]
    row = celeba_fixture.names.index(first)
    assert image.size == ds.CELEBA_IMAGE_SIZE
    assert attributes.tolist() == ((celeba_fixture.attributes[row] + 1) // 2).tolist()
    assert int(identity) == celeba_fixture.identity[row]


def test_rerun_with_everything_present_does_nothing(celeba_fixture, http_server, tmp_path):
    serve_drive(http_server, celeba_fixture)
    params = make_params(tmp_path, http_server, pinned_md5=celeba_fixture.pins("gdrive"))
    download(params.data, params.download)
    target = target_of(params)
    before = {p: p.stat().st_mtime_ns for p in target.rglob("*")}
    http_server.requests.clear()

    download(params.data, params.download)

    assert http_server.requests == []
    assert {p: p.stat().st_mtime_ns for p in target.rglob("*")} == before


def test_a_file_let_in_by_a_pin_that_was_taken_back_is_fetched_again(tmp_path):
    """A corrupt zip accepted under a pin, then the pin replaced by the md5 of a good copy in another folder:
    the old file is no longer vouched for, so the stage fetches the good one (the md5 recorded in sources.json
    when the bad file arrived does not count)."""
    good = write_celeba_fixture(tmp_path / "good", (4, 1, 1), seed=3)
    bad = write_celeba_fixture(tmp_path / "bad", (4, 1, 1), seed=3, corrupt={"000002.jpg": "truncated"})
    assert good.md5[ds.CELEBA_ZIP] != bad.md5[ds.CELEBA_ZIP]
    params = make_params(tmp_path, sources=["local"], local_dir=str(bad.folder), pinned_md5=bad.pins("local"))
    download(params.data, params.download)
    zip_path = target_of(params) / ds.CELEBA_ZIP
    assert zip_path.read_bytes() == bad.path(ds.CELEBA_ZIP).read_bytes()

    params = make_params(
        tmp_path, sources=["local"], local_dir=str(good.folder), pinned_md5=good.pins("local")
    )
    download(params.data, params.download)
    assert zip_path.read_bytes() == good.path(ds.CELEBA_ZIP).read_bytes()
    record = json.loads((params.data.raw_path() / "sources.json").read_text())["files"]
    assert record[ds.CELEBA_ZIP]["md5"] == good.md5[ds.CELEBA_ZIP]


def test_a_zip_rebuilt_from_a_local_folder_is_kept_on_a_rerun(tmp_path):
    """A zip this stage packed from extracted images has no official md5 and needs no pin: a re-run keeps
    it."""
    fixture = write_celeba_fixture(tmp_path / "mine", (4, 1, 1), seed=2, extract=True)
    fixture.path(ds.CELEBA_ZIP).unlink()
    params = make_params(
        tmp_path, sources=["local"], local_dir=str(fixture.folder), pinned_md5=fixture.pins("local")
    )
    download(params.data, params.download)
    zip_path = target_of(params) / ds.CELEBA_ZIP
    before = zip_path.stat().st_mtime_ns
    download(params.data, params.download)
    assert zip_path.stat().st_mtime_ns == before


def test_transfer_cut_mid_file_is_resumed_with_a_range_request(http_server, tmp_path):
    # gdown writes in 512 KiB chunks: the zip must be larger than that for the cut to leave a partial file.
    fixture = write_celeba_fixture(tmp_path / "big", (60, 10, 10), seed=1)
    size = fixture.path(ds.CELEBA_ZIP).stat().st_size
    assert size > 700_000
    serve_drive(http_server, fixture, cut_after=600_000)
    params = make_params(tmp_path, http_server, pinned_md5=fixture.pins("gdrive"), retries=2)

    download(params.data, params.download)

    ranges = [
        r.headers.get("Range")
        for r in http_server.requests_for(f"/gdrive/uc?id={ds.CELEBA_FILES[ds.CELEBA_ZIP].gdrive_id}")
    ]
    assert "bytes=524288-" in ranges, ranges  # resumed after the first complete chunk, not restarted
    assert (target_of(params) / ds.CELEBA_ZIP).read_bytes() == fixture.path(ds.CELEBA_ZIP).read_bytes()
    assert_nothing_half_written(params)


def test_interrupted_run_leaves_a_partial_file_that_the_next_run_resumes(http_server, tmp_path):
    fixture = write_celeba_fixture(tmp_path / "big", (60, 10, 10), seed=1)
    serve_drive(http_server, fixture, cut_after=600_000)
    params = make_params(tmp_path, http_server, pinned_md5=fixture.pins("gdrive"), retries=0)

    with pytest.raises(DataStageError, match="partial download is kept"):
        download(params.data, params.download)
    assert not (target_of(params) / ds.CELEBA_ZIP).exists()
    assert not (target_of(params) / ds.CELEBA_IMAGE_FOLDER).exists()
    assert_nothing_half_written(params)

    download(params.data, params.download)
    zip_requests = http_server.requests_for(f"/gdrive/uc?id={ds.CELEBA_FILES[ds.CELEBA_ZIP].gdrive_id}")
    assert zip_requests[-1].headers.get("Range") == "bytes=524288-"
    assert (target_of(params) / ds.CELEBA_ZIP).read_bytes() == fixture.path(ds.CELEBA_ZIP).read_bytes()


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        (QUOTA_PAGE, "download quota exceeded"),
        (VIRUS_SCAN_PAGE, "virus-scan warning page"),
        (LOGIN_PAGE, "login or access-denied page"),
    ],
)
def test_html_page_instead_of_the_zip_is_reported_as_such(
    celeba_fixture, http_server, tmp_path, page, expected
):
    serve_drive(http_server, celeba_fixture, skip=(ds.CELEBA_ZIP,))
    http_server.add_html(f"/gdrive/uc?id={ds.CELEBA_FILES[ds.CELEBA_ZIP].gdrive_id}", page)
    params = make_params(tmp_path, http_server, pinned_md5=celeba_fixture.pins("gdrive"))

    with pytest.raises(DataStageError) as raised:
        download(params.data, params.download)

    message = str(raised.value)
    assert f"got {ds.CELEBA_ZIP}" not in message
    assert expected in message and ds.CELEBA_ZIP in message and "instead of img_align_celeba.zip" in message
    assert "BadZipFile" not in message and "download.local_dir" in message
    assert not (target_of(params) / ds.CELEBA_ZIP).exists()
    assert not (target_of(params) / ds.CELEBA_IMAGE_FOLDER).exists()
    assert_nothing_half_written(params)


def test_failed_source_falls_through_to_the_hub_mirror_with_a_one_line_reason(
    celeba_fixture, http_server, tmp_path, caplog
):
    serve_drive(http_server, celeba_fixture, skip=(ds.CELEBA_ZIP,))
    http_server.add_html(f"/gdrive/uc?id={ds.CELEBA_FILES[ds.CELEBA_ZIP].gdrive_id}", QUOTA_PAGE)
    serve_hub(http_server, celeba_fixture)
    params = make_params(
        tmp_path,
        http_server,
        sources=["gdrive", "huggingface"],
        pinned_md5=celeba_fixture.pins("gdrive", "huggingface"),
    )

    with caplog.at_level(logging.INFO, logger="pipeline.download"):
        download(params.data, params.download)

    reason = [r.getMessage() for r in caplog.records if "gdrive failed" in r.getMessage()]
    assert len(reason) == 1 and "\n" not in reason[0] and "quota" in reason[0], reason
    record = json.loads((params.data.raw_path() / "sources.json").read_text())["files"]
    assert record[ds.CELEBA_ZIP]["source"] == "huggingface"
    assert record[ds.CELEBA_PARTITION]["source"] == "gdrive"
    assert (target_of(params) / ds.CELEBA_ZIP).read_bytes() == celeba_fixture.path(ds.CELEBA_ZIP).read_bytes()
    assert_nothing_half_written(params)


def test_wrong_checksum_is_refused_with_the_pin_to_add(celeba_fixture, http_server, tmp_path):
    serve_drive(http_server, celeba_fixture)
    pins = {"gdrive": {k: v for k, v in celeba_fixture.md5.items() if k != ds.CELEBA_ZIP}}
    params = make_params(tmp_path, http_server, pinned_md5=pins)

    with pytest.raises(DataStageError) as raised:
        download(params.data, params.download)

    message = str(raised.value)
    got = celeba_fixture.md5[ds.CELEBA_ZIP]
    assert "wrong checksum" in message and got in message and ds.CELEBA_FILES[ds.CELEBA_ZIP].md5 in message
    assert f"download.pinned_md5.gdrive.{ds.CELEBA_ZIP}: {got}" in message
    assert not (target_of(params) / ds.CELEBA_ZIP).exists()
    assert_nothing_half_written(params)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_zip_entries_escaping_the_target_are_refused(celeba_fixture, http_server, tmp_path, kind):
    unsafe = write_unsafe_zip(celeba_fixture, tmp_path / "served" / ds.CELEBA_ZIP, kind)
    serve_drive(http_server, celeba_fixture, skip=(ds.CELEBA_ZIP,))
    http_server.add(f"/gdrive/uc?id={ds.CELEBA_FILES[ds.CELEBA_ZIP].gdrive_id}", unsafe)
    pins = celeba_fixture.pins("gdrive")
    pins["gdrive"][ds.CELEBA_ZIP] = hashlib.md5(unsafe.read_bytes()).hexdigest()
    params = make_params(tmp_path, http_server, pinned_md5=pins)

    with pytest.raises(DataStageError) as raised:
        download(params.data, params.download)

    message = str(raised.value)
    assert "refusing to extract" in message
    assert {"dotdot": "'..'", "absolute": "absolute path", "symlink": "symbolic link"}[kind] in message
    assert not (target_of(params) / ds.CELEBA_ZIP).exists()
    assert not (target_of(params) / ds.CELEBA_IMAGE_FOLDER).exists()
    assert not list(tmp_path.rglob("evil.jpg")) and not Path("/tmp/celeba-fixture-evil.jpg").exists()
    assert_nothing_half_written(params)


def test_missing_annotation_file_names_it_and_what_was_tried(celeba_fixture, http_server, tmp_path):
    serve_drive(http_server, celeba_fixture, skip=(ds.CELEBA_IDENTITY,))
    serve_hub(http_server, celeba_fixture, skip=(ds.CELEBA_IDENTITY,))
    params = make_params(
        tmp_path,
        http_server,
        sources=["gdrive", "huggingface"],
        pinned_md5=celeba_fixture.pins("gdrive", "huggingface"),
    )

    with pytest.raises(DataStageError) as raised:
        download(params.data, params.download)

    message = str(raised.value)
    assert message.count(f"{ds.CELEBA_IDENTITY}:") == 1 and "could not get 1 CelebA file" in message
    assert "gdrive: HTTP 404" in message and f"{HF_REPO}@main has no file {ds.CELEBA_IDENTITY}" in message
    assert "download.local_dir" in message
    assert not (target_of(params) / ds.CELEBA_IDENTITY).exists()
    assert not (target_of(params) / ds.CELEBA_IMAGE_FOLDER).exists(), "extracted although a file is missing"
    assert (target_of(params) / ds.CELEBA_ZIP).exists()  # verified files are kept for the next run
    assert_nothing_half_written(params)


def test_no_network_lists_every_source_tried_and_how_to_provide_a_local_copy(tmp_path):
    dead = "http://127.0.0.1:9"  # discard port: connection refused
    params = make_params(
        tmp_path,
        sources=["local", "gdrive", "huggingface", "kaggle"],
        gdrive_url=dead + "/uc?id={file_id}",
        huggingface_endpoint=dead,
        kaggle_url=dead + "/{dataset}",
    )

    with pytest.raises(DataStageError) as raised:
        download(params.data, params.download)

    message = str(raised.value)
    assert "could not get 6 CelebA file(s)" in message
    for reason in (
        "download.local_dir is not set",
        "cannot connect to 127.0.0.1:9",
        "cannot reach " + dead,
        "skipped, cannot connect",
    ):
        assert reason in message, reason
    assert "set download.local_dir to that folder" in message and ds.CELEBA_DRIVE_FOLDER in message
    assert not any(params.data.raw_path().rglob("*.zip"))


def test_flaky_server_is_retried(celeba_fixture, http_server, tmp_path):
    serve_drive(http_server, celeba_fixture, fail_times=2)
    params = make_params(tmp_path, http_server, pinned_md5=celeba_fixture.pins("gdrive"), retries=2)

    download(params.data, params.download)

    assert (target_of(params) / ds.CELEBA_ZIP).read_bytes() == celeba_fixture.path(ds.CELEBA_ZIP).read_bytes()


def test_local_copy_in_torchvision_layout(celeba_fixture, tmp_path):
    params = make_params(
        tmp_path,
        sources=["local"],
        local_dir=str(celeba_fixture.root),
        pinned_md5=celeba_fixture.pins("local"),
    )

    download(params.data, params.download)

    assert (
        sorted(p.name for p in (target_of(params) / ds.CELEBA_IMAGE_FOLDER).iterdir() if p.suffix == ".jpg")
        == celeba_fixture.names
    )
    record = json.loads((params.data.raw_path() / "sources.json").read_text())["files"]
    assert record[ds.CELEBA_ZIP]["source"] == "local"


def test_local_folder_with_extracted_images_only_is_packed_into_the_zip(tmp_path):
    fixture = write_celeba_fixture(tmp_path / "mine", (4, 1, 1), seed=2, extract=True)
    fixture.path(ds.CELEBA_ZIP).unlink()
    params = make_params(
        tmp_path, sources=["local"], local_dir=str(fixture.folder), pinned_md5=fixture.pins("local")
    )

    download(params.data, params.download)

    target = target_of(params)
    with zipfile.ZipFile(target / ds.CELEBA_ZIP) as archive:
        assert sorted(archive.namelist())[1:] == [f"img_align_celeba/{n}" for n in fixture.names]
    for name in fixture.names:
        assert (target / ds.CELEBA_IMAGE_FOLDER / name).read_bytes() == (
            fixture.folder / ds.CELEBA_IMAGE_FOLDER / name
        ).read_bytes()


def test_kaggle_archive_supplies_the_images_only_when_pinned(celeba_fixture, http_server, tmp_path):
    archive = write_kaggle_archive(celeba_fixture, tmp_path / "served" / "celeba-dataset.zip")
    http_server.add("/kaggle/jessicali9530/celeba-dataset", archive)
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    for name in ds.CELEBA_ANNOTATIONS:
        shutil.copy(celeba_fixture.path(name), annotations / name)
    pins = celeba_fixture.pins("local")
    params = make_params(
        tmp_path, http_server, sources=["kaggle", "local"], local_dir=str(annotations), pinned_md5=pins
    )

    with pytest.raises(DataStageError) as raised:  # Kaggle publishes no checksum: a pin is required
        download(params.data, params.download)
    archive_md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    assert f"download.pinned_md5.kaggle.celeba-dataset.zip: {archive_md5}" in str(raised.value)
    assert "the Kaggle archive has no list_attr_celeba.txt" not in str(raised.value)  # those came from local

    pins["kaggle"] = {"celeba-dataset.zip": archive_md5}
    params = make_params(
        tmp_path, http_server, sources=["kaggle", "local"], local_dir=str(annotations), pinned_md5=pins
    )
    download(params.data, params.download)

    target = target_of(params)
    record = json.loads((params.data.raw_path() / "sources.json").read_text())["files"]
    assert record[ds.CELEBA_ZIP]["source"] == "kaggle" and record[ds.CELEBA_PARTITION]["source"] == "local"
    with (
        zipfile.ZipFile(target / ds.CELEBA_ZIP) as repacked,
        zipfile.ZipFile(celeba_fixture.path(ds.CELEBA_ZIP)) as original,
    ):
        for name in celeba_fixture.names:
            assert repacked.read(f"img_align_celeba/{name}") == original.read(f"img_align_celeba/{name}")
    assert len(list((target / ds.CELEBA_IMAGE_FOLDER).glob("*.jpg"))) == len(celeba_fixture.names)


def test_describe_html_tells_pages_from_files(celeba_fixture):
    assert describe_html(QUOTA_PAGE.encode()).startswith("Google Drive's 'download quota exceeded' page")
    assert "virus-scan" in describe_html(VIRUS_SCAN_PAGE.encode())
    assert "login" in describe_html(LOGIN_PAGE.encode())
    assert (
        describe_html(b"<html><head><title>502 Bad Gateway</title></head></html>")
        == "an HTML page titled '502 bad gateway'"
    )
    assert "AccessDenied".lower() in describe_html(
        b'<?xml version="1.0"?><Error><Code>AccessDenied</Code></Error>'
    )
    for name in ds.CELEBA_FILES:
        assert describe_html(celeba_fixture.path(name).read_bytes()[:65536]) is None, name


def test_stage_exits_nonzero_with_a_clear_message_and_no_traceback(tmp_path, capsys):
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["data"].update(raw_dir=str(tmp_path / "raw"), processed_dir=str(tmp_path / "processed"))
    params["download"].update(
        sources=["local", "gdrive"],
        local_dir=str(tmp_path / "nothing-here"),
        gdrive_url="http://127.0.0.1:9/uc?id={file_id}",
        retries=0,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))

    assert (
        main(["--params", str(tmp_path / "params.yaml")]) == 1
    )  # `python -m` runs: see test_mnist_data's dvc test

    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert "download failed: could not get 6 CelebA file(s)" in error
    assert "is not a folder" in error and "cannot connect to 127.0.0.1:9" in error
