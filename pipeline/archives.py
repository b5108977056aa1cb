"""Safe reading of downloaded archives and the file modes of what the data stages write; shared by the
download and preprocess stages (so that the preprocess stage does not import, and re-run for, the download
code)."""

from __future__ import annotations

import re
import stat
import zipfile
from pathlib import PurePosixPath

from pipeline import datasets as ds
from pipeline.datasets import DataStageError


class UnsafeArchiveError(DataStageError):
    """An archive entry would be written outside the target folder (``../``, absolute path, link, device)."""


def _unsafe_reason(info: zipfile.ZipInfo) -> str | None:
    name = info.filename
    mode = info.external_attr >> 16
    if "\\" in name:
        return "contains a backslash"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "contains '..' and would be written outside the target folder"
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if mode and stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is a device, pipe or other special file"
    return None


def check_archive_entries(archive: zipfile.ZipFile, archive_name: str) -> None:
    """Refuse an archive with any entry that could escape the extraction folder.

    Raises:
        UnsafeArchiveError: an entry with ``..``, an absolute path, a backslash, a symbolic link or a special
        file.
    """
    for info in archive.infolist():
        reason = _unsafe_reason(info)
        if reason:
            raise UnsafeArchiveError(
                f"{archive_name}: entry {info.filename!r} {reason}; refusing to extract this "
                f"archive (it is corrupt or malicious). Delete it and download it again."
            )


def celeba_image_entries(
    archive: zipfile.ZipFile, archive_name: str, prefix: str = ds.CELEBA_IMAGE_FOLDER + "/"
) -> dict[str, zipfile.ZipInfo]:
    """The JPEG entries directly under ``prefix`` in a CelebA-layout archive, keyed by file name
    (``000001.jpg``).

    Raises:
        UnsafeArchiveError: see :func:`check_archive_entries`.
        DataStageError: duplicate entries, or an entry nested deeper than ``prefix``.
    """
    check_archive_entries(archive, archive_name)
    images: dict[str, zipfile.ZipInfo] = {}
    for info in archive.infolist():
        if (
            info.is_dir()
            or not info.filename.startswith(prefix)
            or not info.filename.lower().endswith(".jpg")
        ):
            continue
        name = info.filename[len(prefix) :]
        if "/" in name:
            raise DataStageError(
                f"{archive_name}: unexpected nested entry {info.filename!r} (expected {prefix}NNNNNN.jpg)"
            )
        if name in images:
            raise DataStageError(f"{archive_name}: duplicate entry {info.filename!r}")
        images[name] = info
    return images
