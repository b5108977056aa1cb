"""Where files come from: what a source is, how the copy it delivers is verified (not a web page; the official
md5, one pinned in ``download.pinned_md5``, or for a re-compressed IDX file the md5 of its content) and what
to pin when it differs; and the local folder source. Each source puts a verified copy of a file in its staging
folder or raises SourceError with a one-line reason. The sources that fetch over the network (Google Drive,
Kaggle, the MNIST mirrors, the Hugging Face Hub) are ``pipeline.download.remote_sources``'."""

from __future__ import annotations

import gzip
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import datasets as ds
from pipeline.common import atomic_output
from pipeline.datasets import DataStageError, RemoteFile

if TYPE_CHECKING:
    from pipeline.config import DownloadConfig

from pipeline.download.checks import (
    _CHUNK,
    SourceError,
    _check_names,
    _copy_with_md5,
    _write_celeba_zip,
    file_md5,
    gzip_content_md5,
    read_partition_names,
    sniff_html,
)

log = logging.getLogger("pipeline.download")



@dataclass
class Fetched:
    """A verified candidate in the staging folder: its md5 and how it was verified (recorded in
    sources.json)."""

    path: Path
    md5: str
    verified_by: str
    # What a later run may trust the file on, besides an official or currently pinned md5: a zip rebuilt from
    # a local folder ({"kind": "rebuilt"}, its image names were checked) or repacked from an archive whose pin
    # must still be in params ({"kind": "repacked", "pin": [source, archive name, md5]}). None: nothing else.
    basis: dict[str, Any] | None = None


class Source:
    """One place files can come from. ``fetch`` puts a verified copy in the staging folder or raises
    SourceError."""

    name = "source"
    pin_key = "source"

    def __init__(self, config: DownloadConfig, staging: Path):
        self.config = config
        self.staging = staging / self.name
        self.unreachable: str | None = None

    def fetch(self, spec: RemoteFile) -> Fetched:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name

    def verify(self, path: Path, spec: RemoteFile, note: str = "", md5: str | None = None) -> Fetched:
        """Check a downloaded file: not a web page, and an official or pinned checksum. Deletes it when bad.

        Args:
            path: the candidate in the staging folder.
            spec: the file it should be.
            note: appended to the "verified by" text recorded in sources.json.
            md5: its md5 when already computed while writing it.
        Returns the verified candidate. Raises SourceError with a one-line reason.
        """
        try:
            page = sniff_html(path)
            if page:
                raise SourceError(f"got {page} instead of {spec.name}")
            md5 = md5 or file_md5(path, f"md5 {spec.name}")
            if md5 == spec.md5:
                return Fetched(path, md5, "official md5" + note)
            pinned = self.config.pinned_md5.get(self.pin_key, {}).get(spec.name)
            if pinned and md5 == pinned:
                return Fetched(path, md5, f"md5 pinned in download.pinned_md5.{self.pin_key}" + note)
            if spec.content_md5 and spec.name.endswith(".gz"):
                content = gzip_content_md5(path)
                if content == spec.content_md5:
                    return Fetched(
                        path,
                        md5,
                        f"official md5 {content} of the decompressed IDX data (a re-compressed copy)" + note,
                    )
            raise SourceError(_md5_mismatch(spec.name, md5, spec.md5, self.pin_key, pinned))
        except SourceError:
            path.unlink(missing_ok=True)
            raise


def _md5_mismatch(name: str, got: str, official: str | None, pin_key: str, pinned: str | None) -> str:
    wanted = f"the official {official}" if official else "official (there is none for this file)"
    pin = f" or the pinned {pinned}" if pinned else ""
    return (
        f"wrong checksum: md5 of {name} is {got}, not {wanted}{pin}; if you trust this copy, pin it: in "
        f"params.yaml as download.pinned_md5.{pin_key}.{name}: {got} (or for one experiment: "
        f"{pin_override(pin_key, name, got)})"
    )


def pin_override(pin_key: str, name: str, md5: str) -> str:
    """The ``dvc exp run`` option that pins one file's md5 for an experiment. File names hold dots, which
    DVC's dotted override keys cannot, so the pin is written as a mapping merged into the source's pins
    (``++``: add or replace, whether or not the source has pins yet)."""
    return f"dvc exp run -S '++download.pinned_md5.{pin_key}={{{name}: {md5}}}'"


class LocalSource(Source):
    """A folder the user filled by hand: torchvision's ``celeba/`` layout, or the zip and .txt files side by
    side.

    If the folder has the extracted ``img_align_celeba/`` images but no zip, the zip is rebuilt from them (its
    md5 cannot match the official one; the image names are checked against ``list_eval_partition.txt``
    instead).
    """

    name = "local"
    pin_key = "local"

    def __init__(self, config: DownloadConfig, staging: Path, folder: Path | None, setting: str):
        super().__init__(config, staging)
        self.folder = folder
        self.setting = setting
        self.partition: Path | None = None  # set by the CelebA loop once the partition file is in place

    def describe(self) -> str:
        return f"local ({self.folder})" if self.folder else "local"

    def _candidates(self, name: str) -> list[Path]:
        assert self.folder is not None
        return [self.folder / name, self.folder / ds.CELEBA_FOLDER / name, self.folder / "raw" / name]

    def fetch(self, spec: RemoteFile) -> Fetched:
        if self.folder is None:
            raise SourceError(f"{self.setting} is not set")
        from pipeline.config import resolve

        self.folder = resolve(self.folder)
        if not self.folder.is_dir():
            raise SourceError(f"{self.setting} {self.folder} is not a folder")
        found = next((p for p in self._candidates(spec.name) if p.is_file()), None)
        if found is None and spec.name.endswith(".gz"):
            plain = next((p for p in self._candidates(spec.name[:-3]) if p.is_file()), None)
            if plain is not None:
                return self._gzip_plain(plain, spec)
        if found is None and spec.name == ds.CELEBA_ZIP:
            folder = next((p for p in self._candidates(ds.CELEBA_IMAGE_FOLDER) if p.is_dir()), None)
            if folder is not None:
                return self._zip_folder(folder)
        if found is None:
            raise SourceError(f"no {spec.name} in {self.folder} (nor in its celeba/ subfolder)")
        target = self.staging / spec.name
        md5 = _copy_with_md5(found, target)
        return self.verify(target, spec, f" (copied from {found})", md5)

    def _gzip_plain(self, plain: Path, spec: RemoteFile) -> Fetched:
        target = self.staging / spec.name
        with (
            atomic_output(target) as tmp,
            open(plain, "rb") as fin,
            open(tmp, "wb") as raw_out,
            gzip.GzipFile(filename=plain.name, mode="wb", fileobj=raw_out, mtime=0) as fout,
        ):
            shutil.copyfileobj(fin, fout, _CHUNK)
        return self.verify(target, spec, f" (gzipped from {plain})")

    def _zip_folder(self, folder: Path) -> Fetched:
        images = {p.name: p for p in folder.iterdir() if p.suffix.lower() == ".jpg" and p.is_file()}
        if self.partition is None or not self.partition.is_file():
            raise SourceError(
                f"found the image folder {folder} but no zip; packing it needs {ds.CELEBA_PARTITION} "
                "first to check the image names"
            )
        try:
            _check_names(set(images), read_partition_names(self.partition), str(folder))
        except DataStageError as error:
            raise SourceError(str(error)) from None
        target = self.staging / ds.CELEBA_ZIP
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("    packing %d images of %s into %s", len(images), folder, ds.CELEBA_ZIP)
        _write_celeba_zip({n: (lambda p=p: open(p, "rb")) for n, p in images.items()}, target)
        return Fetched(
            target,
            file_md5(target),
            f"rebuilt from the local folder {folder} ({len(images)} images, names checked against "
            f"{ds.CELEBA_PARTITION}; the official md5 covers only the original zip)",
            {"kind": "rebuilt"},
        )
