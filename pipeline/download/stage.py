"""The download stage: for each file, a verified copy already present or the first source that delivers one;
CelebA extracted into torchvision's layout; the record of where each file came from (sources.json)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from pipeline import datasets as ds
from pipeline import storage_access
from pipeline.archives import UnsafeArchiveError, celeba_image_entries
from pipeline.cli import data_stage_main
from pipeline.common import atomic_write_text, make_readable
from pipeline.datasets import DataStageError, RemoteFile
from pipeline.job_submission import run_data_stage

if TYPE_CHECKING:
    from pipeline.config import DataConfig, DownloadConfig

from pipeline.download.checks import (
    _CHUNK,
    SOURCES_RECORD,
    STAGING_DIR,
    SourceError,
    _check_names,
    _remove,
    file_md5,
    gzip_content_md5,
    read_partition_names,
)
from pipeline.download.remote_sources import GoogleDriveSource, HuggingFaceSource, KaggleSource, MirrorSource
from pipeline.download.sources import LocalSource, Source

log = logging.getLogger("pipeline.download")



class SourcesRecord:
    """``sources.json`` beside the files: for each file its md5, the source that delivered it, how it was
    verified and (for a rebuilt or repacked zip) the basis a re-run may trust it on (see :func:`_present`)."""

    def __init__(self, path: Path, dataset: str):
        self.path = path
        self.data: dict[str, Any] = {"dataset": dataset, "files": {}}
        if path.is_file():
            with contextlib.suppress(ValueError, OSError):
                loaded = json.loads(path.read_text())
                if isinstance(loaded.get("files"), dict):
                    self.data["files"] = loaded["files"]

    def md5(self, name: str) -> str | None:
        entry = self.data["files"].get(name)
        return entry.get("md5") if isinstance(entry, dict) else None

    def basis(self, name: str) -> dict[str, Any] | None:
        entry = self.data["files"].get(name)
        return entry.get("basis") if isinstance(entry, dict) else None

    def set(
        self, name: str, md5: str, source: str, verified_by: str, basis: dict[str, Any] | None = None
    ) -> None:
        self.data["files"][name] = {"md5": md5, "source": source, "verified_by": verified_by}
        if basis:
            self.data["files"][name]["basis"] = basis

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")


def _still_trusted(basis: dict[str, Any] | None, config: DownloadConfig) -> bool:
    """Whether a recorded basis (see :class:`Fetched`) still holds under the current params."""
    if not basis:
        return False
    if basis.get("kind") == "rebuilt":
        return True
    if basis.get("kind") == "repacked":
        source, name, md5 = basis["pin"]
        return config.pinned_md5.get(source, {}).get(name) == md5
    return False


def _present(path: Path, spec: RemoteFile, record: SourcesRecord, config: DownloadConfig) -> bool:
    """Is a verified copy of ``spec`` already at ``path``? Only if its md5 is the official one or one pinned
    in the current params (or its decompressed content is official, or it is a zip this stage rebuilt or
    repacked on a basis that still holds): a pin taken out of params.yaml no longer vouches for the file it
    once let in. A file that fails the check is deleted (and fetched again)."""
    if not path.is_file():
        return False
    md5 = file_md5(path, f"md5 {spec.name}")
    pinned = {pins[spec.name] for pins in config.pinned_md5.values() if spec.name in pins}
    if md5 == spec.md5 or md5 in pinned:
        if record.md5(spec.name) != md5:
            record.set(spec.name, md5, "already present", "official md5" if md5 == spec.md5 else "pinned md5")
        return True
    if md5 == record.md5(spec.name) and _still_trusted(record.basis(spec.name), config):
        return True
    try:
        same_content = bool(spec.content_md5) and gzip_content_md5(path) == spec.content_md5
    except SourceError:  # not valid gzip
        same_content = False
    if same_content:
        if record.md5(spec.name) != md5:
            record.set(spec.name, md5, "already present", "official md5 of the decompressed IDX data")
        return True
    log.warning("  %s: present but its md5 %s is not an accepted one; fetching it again", spec.name, md5)
    path.unlink()
    return False


def _fetch_files(
    specs: list[RemoteFile],
    sources: list[Source],
    target: Path,
    record: SourcesRecord,
    config: DownloadConfig,
    check: Callable[[RemoteFile, Path], None] | None = None,
) -> dict[str, list[str]]:
    """Get each file into ``target`` from the first source that delivers a verified copy.

    Returns ``{file name: [one-line reason per source tried]}`` for the files no source delivered.
    """
    failures: dict[str, list[str]] = {}
    target.mkdir(parents=True, exist_ok=True)
    for spec in specs:
        final = target / spec.name
        if _present(final, spec, record, config):
            log.info("  %s: present and verified", spec.name)
            continue
        reasons = []
        for source in sources:
            if source.unreachable:
                reasons.append(f"{source.describe()}: skipped, {source.unreachable}")
                continue
            log.info("  %s: trying %s", spec.name, source.describe())
            try:
                fetched = source.fetch(spec)
                if check is not None:
                    try:
                        check(spec, fetched.path)
                    except DataStageError as error:
                        fetched.path.unlink(missing_ok=True)
                        raise SourceError(str(error)) from None
            except SourceError as error:
                reasons.append(f"{source.describe()}: {error}")
                log.warning("  %s: %s failed: %s", spec.name, source.describe(), error)
                continue
            make_readable(fetched.path)
            os.replace(fetched.path, final)
            record.set(spec.name, fetched.md5, source.name, fetched.verified_by, fetched.basis)
            record.save()
            log.info("  %s: done (%s: %s)", spec.name, source.name, fetched.verified_by)
            break
        else:
            failures[spec.name] = reasons
    return failures


def _failure_message(dataset: str, failures: dict[str, list[str]], target: Path, how_to: str) -> str:
    lines = [f"could not get {len(failures)} {dataset} file(s) into {target}. Tried, per file:"]
    for name, reasons in failures.items():
        lines.append(f"  {name}:")
        lines.extend(f"    - {reason}" for reason in reasons or ["no source configured"])
    lines.append(how_to)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ CelebA


def _celeba_zip_check(target: Path) -> Callable[[RemoteFile, Path], None]:
    def check(spec: RemoteFile, path: Path) -> None:
        if spec.name != ds.CELEBA_ZIP:
            return
        try:
            with zipfile.ZipFile(path) as archive:
                images = celeba_image_entries(archive, spec.name)
        except zipfile.BadZipFile as error:
            raise DataStageError(f"{spec.name} is not a valid zip ({error})") from None
        partition = target / ds.CELEBA_PARTITION
        if partition.is_file():
            _check_names(set(images), read_partition_names(partition), spec.name)

    return check


def extract_celeba_images(folder: Path, zip_md5: str | None = None) -> Path:
    """Extract ``img_align_celeba.zip`` into ``folder/img_align_celeba/`` safely and atomically.

    The entries are checked first (:func:`check_archive_entries`); the images are written into a temporary
    folder beside the target, their names are checked against ``list_eval_partition.txt`` (202,599 images for
    the real data), and the folder is renamed into place. An existing folder from the same zip (its
    ``.source-md5`` marker) with the right image count is left alone.

    Returns the image folder. Raises UnsafeArchiveError or DataStageError; on failure nothing is left behind.
    """
    archive_path = folder / ds.CELEBA_ZIP
    out = folder / ds.CELEBA_IMAGE_FOLDER
    marker = ".source-md5"
    expected = read_partition_names(folder / ds.CELEBA_PARTITION)
    partition_md5 = file_md5(folder / ds.CELEBA_PARTITION)
    if partition_md5 == ds.CELEBA_FILES[ds.CELEBA_PARTITION].md5 and len(expected) != ds.CELEBA_IMAGE_COUNT:
        raise DataStageError(
            f"{ds.CELEBA_PARTITION} lists {len(expected)} images, not {ds.CELEBA_IMAGE_COUNT}"
        )
    zip_md5 = zip_md5 or file_md5(archive_path, f"md5 {ds.CELEBA_ZIP}")
    for stale in folder.glob(f".{ds.CELEBA_IMAGE_FOLDER}.partial-*"):
        _remove(stale)
    if out.is_dir():
        recorded = (out / marker).read_text().strip() if (out / marker).is_file() else None
        count = sum(1 for entry in os.scandir(out) if entry.name.endswith(".jpg"))
        if recorded == zip_md5 and count == len(expected):
            log.info(
                "  %s/: %d images, extracted from this zip; nothing to do", ds.CELEBA_IMAGE_FOLDER, count
            )
            return out
        log.warning(
            "  %s/ is stale or incomplete (%d images, from zip %s); extracting again",
            ds.CELEBA_IMAGE_FOLDER,
            count,
            recorded,
        )
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".{ds.CELEBA_IMAGE_FOLDER}.partial-"))
    try:
        with zipfile.ZipFile(archive_path) as archive:
            images = celeba_image_entries(archive, ds.CELEBA_ZIP)
            _check_names(set(images), expected, ds.CELEBA_ZIP)
            root = tmp.resolve()
            for name in tqdm(sorted(images), desc=f"extract {ds.CELEBA_ZIP}", unit="img", disable=None):
                path = (tmp / name).resolve()
                if path.parent != root:  # belt and braces: names were checked above
                    raise UnsafeArchiveError(f"{ds.CELEBA_ZIP}: entry {name!r} escapes the target folder")
                with archive.open(images[name]) as source, open(path, "xb") as target:
                    shutil.copyfileobj(source, target, _CHUNK)
        (tmp / marker).write_text(zip_md5 + "\n")
        make_readable(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(dir=folder, prefix=f".{ds.CELEBA_IMAGE_FOLDER}.partial-old-"))
            os.replace(out, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, out)
    except zipfile.BadZipFile as error:
        raise DataStageError(
            f"{archive_path}: corrupt zip ({error}); delete it and run the download again"
        ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("  extracted %d images into %s", len(expected), out)
    return out


def _celeba_how_to(target: Path) -> str:
    names = ", ".join(ds.CELEBA_FILES)
    return (
        f"To provide a local copy: download {names} by hand (official Google Drive folder "
        f"{ds.CELEBA_DRIVE_FOLDER}, linked from {ds.CELEBA_HOMEPAGE}; a browser gets past Drive's quota and "
        "virus-scan pages), put them in one folder (or use a torchvision celeba/ folder), set "
        "download.local_dir to that folder in params.yaml, and run `dvc repro download` again. "
        "A mirror's copy that differs from the official md5 "
        "needs download.pinned_md5.<source>.<file>: <md5>. "
        f"Verified files already in {target} are kept."
    )


def download_celeba(config: DownloadConfig, raw_root: Path) -> Path:
    """Download, verify and extract CelebA into ``raw_root/celeba/`` (torchvision's layout).

    Args:
        config: the ``download`` section.
        raw_root: ``data/raw/celeba`` (``DataConfig.raw_path()``).
    Returns:
        ``raw_root/celeba``, holding the zip, the five .txt files and the extracted ``img_align_celeba/``.
    Raises:
        DataStageError: some file could not be obtained from any source (the message lists what was tried and
            how to provide a local copy), or the archive is unsafe or inconsistent with the partition file.
    """
    target = raw_root / ds.CELEBA_FOLDER
    staging = raw_root.parent / STAGING_DIR / raw_root.name
    record = SourcesRecord(raw_root / SOURCES_RECORD, "celeba")
    sources: list[Source] = []
    for name in config.sources:
        if name == "local":
            local = LocalSource(config, staging, config.local_dir, "download.local_dir")
            local.partition = target / ds.CELEBA_PARTITION
            sources.append(local)
        elif name == "gdrive":
            sources.append(GoogleDriveSource(config, staging))
        elif name == "huggingface":
            sources.append(HuggingFaceSource(config, staging))
        elif name == "kaggle":
            sources.append(KaggleSource(config, staging))
    log.info("CelebA -> %s (sources in order: %s)", target, ", ".join(s.describe() for s in sources))
    failures = _fetch_files(
        list(ds.CELEBA_FILES.values()), sources, target, record, config, check=_celeba_zip_check(target)
    )
    if record.data["files"]:
        record.save()
    if failures:
        raise DataStageError(_failure_message("CelebA", failures, target, _celeba_how_to(target)))
    extract_celeba_images(target, record.md5(ds.CELEBA_ZIP))
    shutil.rmtree(staging, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------ MNIST family


def download_mnist_family(dataset: str, config: DownloadConfig, raw_root: Path) -> Path:
    """Get the four official IDX ``.gz`` files of ``mnist`` or ``fashion_mnist`` into ``raw_root``.

    Sources in order: the local folder (``download.<dataset>_local_dir``; ``.gz`` files, or uncompressed IDX
    files which are then gzipped), then each mirror URL. A file is accepted by the official md5 of the
    ``.gz``, or by the official md5 of its decompressed content (re-compressed copies such as Debian's), or a
    pin.

    Returns ``raw_root``. Raises DataStageError listing what was tried when a file cannot be obtained.
    """
    files = ds.MNIST_FAMILY_FILES[dataset]
    local_dir = config.mnist_local_dir if dataset == "mnist" else config.fashion_mnist_local_dir
    mirrors = config.mnist_mirrors if dataset == "mnist" else config.fashion_mnist_mirrors
    staging = raw_root.parent / STAGING_DIR / raw_root.name
    sources: list[Source] = [LocalSource(config, staging, local_dir, f"download.{dataset}_local_dir")]
    sources += [MirrorSource(config, staging, url, i) for i, url in enumerate(mirrors)]
    record = SourcesRecord(raw_root / SOURCES_RECORD, dataset)
    log.info("%s -> %s (sources in order: %s)", dataset, raw_root, ", ".join(s.describe() for s in sources))
    failures = _fetch_files(list(files.values()), sources, raw_root, record, config)
    record.save()
    if failures:
        hint = (
            "To provide a local copy: put the four files (" + ", ".join(files) + f") in a folder and set "
            f"download.{dataset}_local_dir to it in params.yaml"
            + (
                " (Debian/Ubuntu: `apt-get install dataset-fashion-mnist` puts them in "
                "/usr/share/datasets/fashion-mnist)"
                if dataset == "fashion_mnist"
                else ""
            )
            + ", then run `dvc repro download` again."
        )
        raise DataStageError(_failure_message(dataset, failures, raw_root, hint))
    shutil.rmtree(staging, ignore_errors=True)
    return raw_root


def record_image_folder(data: DataConfig, raw_root: Path, endpoint: str | None = None) -> None:
    """``data.dataset: image_folder``: nothing is copied (the preprocess stage reads the images in place and
    depends on the folder in dvc.yaml); the stage checks that the folder exists and records it in
    ``sources.json``.

    Raises:
        DataStageError: the folder does not exist (names the setting and the path).
        pipeline.storage_access.StorageError: an s3 location that cannot be listed.
    """
    folder = data.image_folder_location()
    if storage_access.is_uri(folder):
        storage_access.check_location(folder, endpoint, "data.image_folder")
    elif not Path(folder).is_dir():
        raise DataStageError(
            f"data.image_folder {folder} is not a folder; put your images there or point data.image_folder "
            "in params.yaml at the folder (or s3://bucket/prefix) that holds them"
        )
    raw_root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(raw_root / SOURCES_RECORD, json.dumps(
        {"dataset": "image_folder", "image_folder": folder, "files": {},
         "note": "images are read in place by the preprocess stage"}, indent=2) + "\n")
    log.info("image_folder: %s is read in place by the preprocess stage", folder)


def download(data: DataConfig, config: DownloadConfig, endpoint: str | None = None) -> Path:
    """Run the download stage for ``data.dataset``; returns its raw folder (``data.raw_path()``).
    ``endpoint``: ``cluster.s3_endpoint_url``, for an image folder on S3."""
    raw_root = data.raw_path()
    if data.dataset == "celeba":
        download_celeba(config, raw_root)
    elif data.dataset == "image_folder":
        record_image_folder(data, raw_root, endpoint)
    else:
        download_mnist_family(data.dataset, config, raw_root)
    return raw_root


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.download [--params PATH]``: exit status 0, or 1 with a message on stderr."""
    def run(params):
        return download(params.data, params.download, params.cluster.s3_endpoint_url)

    return data_stage_main("pipeline.download", __doc__, argv, run, log,
                           interrupted="partial downloads are kept in data/raw/.downloads for the next run",
                           submit=run_data_stage)


if __name__ == "__main__":
    sys.exit(main())
