"""Download stage: fetch CelebA (or MNIST / Fashion-MNIST) into ``data/raw/<dataset>/``, verified and ready to read.

Run it as ``python -m pipeline.download [--params params.yaml]`` (the DVC stage ``download``). It reads the
``data`` and ``download`` sections of params.yaml.

CelebA ends up in torchvision's layout, so ``torchvision.datasets.CelebA(root="data/raw/celeba")`` reads it::

    data/raw/celeba/sources.json                  which source delivered each file, its md5, how it was verified
    data/raw/celeba/celeba/img_align_celeba.zip   the 202,599 aligned-and-cropped JPEGs (1.4 GB)
    data/raw/celeba/celeba/list_eval_partition.txt, list_attr_celeba.txt, identity_CelebA.txt,
                           list_bbox_celeba.txt, list_landmarks_align_celeba.txt
    data/raw/celeba/celeba/img_align_celeba/      the extracted JPEGs (not a DVC output: see .dvcignore)

The MNIST family ends up as the four official IDX ``.gz`` files in ``data/raw/<dataset>/``.

How a file is obtained: for each file, the sources of ``download.sources`` are tried in order (``local``: a folder
you filled by hand; ``gdrive``: the official Google Drive files via gdown, with torchvision's file ids;
``huggingface``: a Hub mirror via huggingface_hub; ``kaggle``: the Kaggle archive, which supplies the images only).
A copy is accepted when its md5 is the official one, or the one pinned for that source in
``download.pinned_md5`` (mirrors repackage files). An HTML page served instead of a file (Drive's quota or
virus-scan pages, a login page) is recognised and reported as such. Transfers resume after an interruption
(HTTP Range requests, partial files kept in ``data/raw/.downloads/``) and transient errors are retried with
exponential backoff (tenacity). Each source that fails gets a one-line reason and the next one is tried; when no
source delivers a file, the stage fails with the list of what was tried and how to provide a local copy.

Nothing half-written ever sits in ``data/raw/<dataset>/``: a file is moved there (atomic rename) only once
verified; the zip is extracted into a temporary folder, checked (no entry escapes the target: no ``../``, no
absolute path, no link; the image names equal those of ``list_eval_partition.txt``, 202,599 for the real data),
and renamed into place. A re-run with everything present checks the checksums and does nothing else.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tenacity
from tqdm.auto import tqdm

from pipeline import datasets as ds
from pipeline.archives import UnsafeArchiveError, celeba_image_entries, check_archive_entries, make_readable  # noqa: F401 (re-exported)
from pipeline.common import run_stage, stage_argument_parser
from pipeline.datasets import DataStageError, RemoteFile

if TYPE_CHECKING:
    from pipeline.config import DataConfig, DownloadConfig

log = logging.getLogger("pipeline.download")

SOURCES_RECORD = "sources.json"
STAGING_DIR = ".downloads"  # data/raw/.downloads/<dataset>/<source>/: partial and unverified downloads
_CHUNK = 4 << 20
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: zips we build are byte-for-byte reproducible
_PROGRESS_MIN_BYTES = 64 << 20  # hashing/copying progress bars only for big files


class SourceError(Exception):
    """One source could not deliver one file; the message is a one-line reason (the next source is tried)."""


class _SourceUnreachable(SourceError):
    """The source cannot be reached at all (no network, DNS failure): skip it for the remaining files."""


# ------------------------------------------------------------------------------------------------ helpers


def file_md5(path: Path, label: str | None = None) -> str:
    """md5 hex digest of a file, read in 4 MiB blocks (a progress bar for big files when ``label`` is set)."""
    digest = hashlib.md5()
    size = path.stat().st_size
    with open(path, "rb") as handle, _bytes_bar(size, label or f"md5 {path.name}", size >= _PROGRESS_MIN_BYTES) as bar:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def gzip_content_md5(path: Path) -> str:
    """md5 of the decompressed content of a ``.gz`` file. Raises SourceError when it is not valid gzip."""
    digest = hashlib.md5()
    try:
        with gzip.open(path, "rb") as handle:
            for block in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(block)
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise SourceError(f"not a valid gzip file ({error})") from None
    return digest.hexdigest()


def _bytes_bar(total: int, desc: str, enabled: bool = True):
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=None if enabled else True)


_HTML_KINDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("quota exceeded", "too many users have viewed or downloaded", "download quota"),
     "Google Drive's 'download quota exceeded' page (too many downloads of this file in the last 24 hours; "
     "try again tomorrow or fetch it by hand)"),
    (("virus scan warning", "scan this file for viruses", "uc-warning-caption"),
     "Google Drive's virus-scan warning page (a large file needs a confirmation the client could not complete)"),
    (("accounts.google.com", "servicelogin", "sign in", "sign-in", "log in", "login", "403 forbidden", "unauthorized"),
     "a login or access-denied page (the file is private, gated or needs credentials)"),
)


def describe_html(head: bytes) -> str | None:
    """If ``head`` (the first bytes of a download) is an HTML/XML page rather than data, say what page it is.

    Returns None for anything that does not start like a web page (zip, gzip, text annotations).
    """
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<?xml") and b"<error>" in text:
        code = re.search(rb"<code>([^<]{1,80})</code>", text)
        return f"an XML error page from the server ({(code.group(1) if code else b'error').decode(errors='replace')})"
    if not (text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:1024]):
        return None
    decoded = text.decode("utf-8", errors="replace")
    for needles, kind in _HTML_KINDS:
        if any(needle in decoded for needle in needles):
            return kind
    title = re.search(r"<title>(.{0,120}?)</title>", decoded, re.S)
    return f"an HTML page titled {title.group(1).strip()!r}" if title else "an HTML page"


def sniff_html(path: Path) -> str | None:
    """:func:`describe_html` of a file's first 64 KiB."""
    with open(path, "rb") as handle:
        return describe_html(handle.read(64 << 10))


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        make_readable(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _short(error: BaseException) -> str:
    """A one-line description of an exception, innermost useful cause included."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    cause = error.__cause__ or error.__context__
    if cause is not None and str(cause).strip() and str(cause).strip().splitlines()[0] not in text:
        text = f"{text} ({str(cause).strip().splitlines()[0]})"
    return text[:300]


_NO_DNS = ("name or service not known", "temporary failure in name resolution", "nodename nor servname",
           "failed to resolve", "getaddrinfo failed", "no address associated")


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _connection_problem(error: BaseException, host: str) -> str:
    """A short reason for a failed connection: DNS, refused, timed out, or the innermost message."""
    text = " ".join(str(e) for e in _chain(error)).lower()
    if any(s in text for s in _NO_DNS):
        return f"cannot resolve {host} (no network or no DNS)"
    if "refused" in text:
        return "connection refused"
    if "timed out" in text or "timeout" in text:
        return "connection timed out"
    innermost = list(_chain(error))[-1]
    return _short(innermost)


def _is_dns_failure(error: BaseException) -> bool:
    return any(any(s in str(e).lower() for s in _NO_DNS) for e in _chain(error))


def _is_transient(error: BaseException) -> bool:
    """Errors worth retrying: dropped or timed-out connections, cut transfers, HTTP 429 and 5xx."""
    import requests

    if isinstance(error, SourceError) or _is_dns_failure(error):
        return False
    status = _http_status(error)
    if status is not None:
        return status == 429 or status >= 500
    if isinstance(error, requests.exceptions.RequestException | ConnectionError | TimeoutError):
        return True
    name = type(error).__name__
    if name in ("DownloadError", "LocalEntryNotFoundError"):  # gdown: cut transfer; hf: hub unreachable
        return True
    return name.endswith(("ConnectError", "TimeoutException", "ReadError", "RemoteProtocolError", "ReadTimeout"))


def _http_status(error: BaseException) -> int | None:
    for item in _chain(error):
        response = getattr(item, "response", None)
        code = getattr(response, "status_code", None)
        if isinstance(code, int):
            return code
    return None


def _retrying(config: DownloadConfig, what: str) -> tenacity.Retrying:
    """tenacity policy: ``config.retries`` extra attempts, exponential backoff from ``retry_backoff_s``."""

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("    %s: attempt %d failed (%s); retrying in %.1f s (partial data is kept and resumed)",
                    what, state.attempt_number, _short(error) if error else "?", state.next_action.sleep)

    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(config.retries + 1),
        wait=tenacity.wait_exponential(multiplier=config.retry_backoff_s, max=60),
        retry=tenacity.retry_if_exception(_is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )


def _copy_with_md5(src: Path, dst: Path) -> str:
    """Copy ``src`` to ``dst`` (through a temporary file), returning the md5 of the bytes written."""
    digest = hashlib.md5()
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.copying")
    size = src.stat().st_size
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout, \
                _bytes_bar(size, f"copy {src.name}", size >= _PROGRESS_MIN_BYTES) as bar:
            for block in iter(lambda: fin.read(_CHUNK), b""):
                digest.update(block)
                fout.write(block)
                bar.update(len(block))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return digest.hexdigest()


# -------------------------------------------------------------------------------------- archive safety


def read_partition_names(path: Path) -> list[str]:
    """Image file names listed in ``list_eval_partition.txt`` (one ``name split`` pair per line), in order."""
    names = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataStageError(f"{path}: line {number} is not '<image> <0|1|2>': {line[:80]!r}")
        names.append(parts[0])
    return names


def _check_names(found: set[str], expected: list[str], what: str) -> None:
    wanted = set(expected)
    if found == wanted:
        return
    missing = sorted(wanted - found)
    extra = sorted(found - wanted)
    detail = []
    if missing:
        detail.append(f"{len(missing)} listed in {ds.CELEBA_PARTITION} are missing (e.g. {', '.join(missing[:3])})")
    if extra:
        detail.append(f"{len(extra)} are not listed there (e.g. {', '.join(extra[:3])})")
    raise DataStageError(f"{what} has {len(found)} images but {ds.CELEBA_PARTITION} lists {len(wanted)}: "
                         + "; ".join(detail))


def _write_celeba_zip(images: dict[str, Callable[[], Any]], out: Path) -> None:
    """Write an ``img_align_celeba.zip`` in the official layout from ``{name: open-function}`` (reproducibly:
    sorted entries, fixed timestamps, stored uncompressed since JPEGs do not compress)."""
    tmp = out.with_name(f".{out.name}.building")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            folder = zipfile.ZipInfo(ds.CELEBA_IMAGE_FOLDER + "/", date_time=_ZIP_DATE)
            folder.external_attr = (stat.S_IFDIR | 0o755) << 16
            archive.writestr(folder, b"")
            for name in tqdm(sorted(images), desc=f"pack {out.name}", unit="img", leave=False, disable=None):
                info = zipfile.ZipInfo(f"{ds.CELEBA_IMAGE_FOLDER}/{name}", date_time=_ZIP_DATE)
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                with images[name]() as source, archive.open(info, "w", force_zip64=True) as target:
                    shutil.copyfileobj(source, target, _CHUNK)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- sources


@dataclass
class Fetched:
    """A verified candidate in the staging folder: its md5 and how it was verified (recorded in sources.json)."""

    path: Path
    md5: str
    verified_by: str
    # What a later run may trust the file on, besides an official or currently pinned md5: a zip rebuilt from a
    # local folder ({"kind": "rebuilt"}, its image names were checked) or repacked from an archive whose pin must
    # still be in params ({"kind": "repacked", "pin": [source, archive name, md5]}). None: nothing else.
    basis: dict[str, Any] | None = None


class Source:
    """One place files can come from. ``fetch`` puts a verified copy in the staging folder or raises SourceError."""

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
                    return Fetched(path, md5, f"official md5 {content} of the decompressed IDX data (a re-compressed "
                                              "copy)" + note)
            raise SourceError(_md5_mismatch(spec.name, md5, spec.md5, self.pin_key, pinned))
        except SourceError:
            path.unlink(missing_ok=True)
            raise


def _md5_mismatch(name: str, got: str, official: str | None, pin_key: str, pinned: str | None) -> str:
    wanted = f"the official {official}" if official else "official (there is none for this file)"
    pin = f" or the pinned {pinned}" if pinned else ""
    return (f"wrong checksum: md5 of {name} is {got}, not {wanted}{pin}; if you trust this copy, pin it: in "
            f"params.yaml as download.pinned_md5.{pin_key}.{name}: {got} (or for one experiment: "
            f"{pin_override(pin_key, name, got)})")


def pin_override(pin_key: str, name: str, md5: str) -> str:
    """The ``dvc exp run`` option that pins one file's md5 for an experiment. File names hold dots, which DVC's
    dotted override keys cannot, so the pin is written as a mapping merged into the source's pins (``++``: add
    or replace, whether or not the source has pins yet)."""
    return f"dvc exp run -S '++download.pinned_md5.{pin_key}={{{name}: {md5}}}'"


class LocalSource(Source):
    """A folder the user filled by hand: torchvision's ``celeba/`` layout, or the zip and .txt files side by side.

    If the folder has the extracted ``img_align_celeba/`` images but no zip, the zip is rebuilt from them (its md5
    cannot match the official one; the image names are checked against ``list_eval_partition.txt`` instead).
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
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.gzipping")
        try:
            with open(plain, "rb") as fin, open(tmp, "wb") as raw_out, \
                    gzip.GzipFile(filename=plain.name, mode="wb", fileobj=raw_out, mtime=0) as fout:
                shutil.copyfileobj(fin, fout, _CHUNK)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return self.verify(target, spec, f" (gzipped from {plain})")

    def _zip_folder(self, folder: Path) -> Fetched:
        images = {p.name: p for p in folder.iterdir() if p.suffix.lower() == ".jpg" and p.is_file()}
        if self.partition is None or not self.partition.is_file():
            raise SourceError(f"found the image folder {folder} but no zip; packing it needs {ds.CELEBA_PARTITION} "
                              "first to check the image names")
        try:
            _check_names(set(images), read_partition_names(self.partition), str(folder))
        except DataStageError as error:
            raise SourceError(str(error)) from None
        target = self.staging / ds.CELEBA_ZIP
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("    packing %d images of %s into %s", len(images), folder, ds.CELEBA_ZIP)
        _write_celeba_zip({n: (lambda p=p: open(p, "rb")) for n, p in images.items()}, target)
        return Fetched(target, file_md5(target),
                       f"rebuilt from the local folder {folder} ({len(images)} images, names checked against "
                       f"{ds.CELEBA_PARTITION}; the official md5 covers only the original zip)", {"kind": "rebuilt"})


class _HttpSource(Source):
    """Downloads over HTTP(S) with gdown: resumable (Range + If-Range on the kept ``.part`` file), with progress."""

    def _download(self, url: str, target: Path, what: str, *, use_cookies: bool = False) -> None:
        import gdown
        import gdown.exceptions
        import requests

        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # gdown would return an existing file unchecked: start over (a .part file resumes)
            target.unlink()
        quiet = not sys.stderr.isatty()
        log.info("    %s: GET %s", self.name, url)
        try:
            for attempt in _retrying(self.config, f"{self.name} {what}"):
                with attempt:
                    try:
                        gdown.download(url, str(target), quiet=quiet, resume=True, use_cookies=use_cookies,
                                       timeout=self.config.timeout_s, retries=0)
                    except gdown.exceptions.DownloadError as error:
                        if "did not honor" in str(error):  # the server ignored Range: restart from byte 0
                            for part in target.parent.glob(f"{target.name}*.part"):
                                part.unlink()
                        raise
        except gdown.exceptions.FileURLRetrievalError as error:
            page = describe_html(f"<html>{error}</html>".encode())
            raise SourceError(f"Google Drive answered with {page} instead of {what}") from None
        except Exception as error:  # noqa: BLE001 - every failure of one source becomes a one-line reason
            status = _http_status(error)
            if status is not None:
                raise SourceError(f"HTTP {status} for {url}") from None
            if isinstance(error, requests.exceptions.ConnectionError) or _is_dns_failure(error):
                self.unreachable = f"cannot connect to {_host(url)}: {_connection_problem(error, _host(url))}"
                raise _SourceUnreachable(self.unreachable) from None
            raise SourceError(f"{_short(error)} ({url}); the partial download is kept and resumed next time"
                              ) from None


def _host(url: str) -> str:
    match = re.match(r"^[a-z]+://([^/]+)", url)
    return match.group(1) if match else url


class GoogleDriveSource(_HttpSource):
    """The official files on Google Drive (torchvision's file ids), through gdown (confirm tokens, cookies)."""

    name = "gdrive"
    pin_key = "gdrive"

    def fetch(self, spec: RemoteFile) -> Fetched:
        if not spec.gdrive_id:
            raise SourceError(f"no Google Drive id for {spec.name}")
        target = self.staging / spec.name
        self._download(self.config.gdrive_url.format(file_id=spec.gdrive_id), target, spec.name, use_cookies=True)
        return self.verify(target, spec)


class KaggleSource(_HttpSource):
    """Kaggle's CelebA archive: the images (in ``img_align_celeba/img_align_celeba/``) and CSV annotations.

    Only ``img_align_celeba.zip`` comes from here: the archive is verified by its md5 pinned in
    ``download.pinned_md5.kaggle`` (Kaggle publishes no checksum), then its images are repacked into the
    official layout. Its CSV files are not the official .txt files and it has no identity file.
    """

    name = "kaggle"
    pin_key = "kaggle"

    @property
    def archive_name(self) -> str:
        return self.config.kaggle_dataset.split("/")[-1] + ".zip"

    def fetch(self, spec: RemoteFile) -> Fetched:
        if spec.name != ds.CELEBA_ZIP:
            raise SourceError(f"the Kaggle archive has no {spec.name} (it ships CSV versions of some annotations)")
        archive = self.staging / self.archive_name
        pinned = self.config.pinned_md5.get("kaggle", {}).get(self.archive_name)
        if not (archive.is_file() and pinned and file_md5(archive) == pinned):
            url = self.config.kaggle_url.format(dataset=self.config.kaggle_dataset)
            self._download(url, archive, self.archive_name)
            page = sniff_html(archive)
            if page:
                archive.unlink()
                raise SourceError(f"got {page} instead of {self.archive_name}")
            md5 = file_md5(archive, f"md5 {self.archive_name}")
            if md5 != pinned:
                archive.unlink()
                raise SourceError(_md5_mismatch(self.archive_name, md5, None, "kaggle", pinned))
        target = self.staging / ds.CELEBA_ZIP
        try:
            with zipfile.ZipFile(archive) as zf:
                prefixes = {i.filename.rsplit("/", 1)[0] + "/" for i in zf.infolist()
                            if re.search(r"(^|/)img_align_celeba/[^/]+\.jpg$", i.filename, re.I)}
                if len(prefixes) != 1:
                    raise SourceError(f"{self.archive_name} has no single img_align_celeba/ image folder "
                                      f"(found {sorted(prefixes)[:3]})")
                entries = celeba_image_entries(zf, self.archive_name, prefixes.pop())
                _write_celeba_zip({n: (lambda i=i: zf.open(i)) for n, i in entries.items()}, target)
        except zipfile.BadZipFile as error:
            archive.unlink(missing_ok=True)
            raise SourceError(f"{self.archive_name} is not a valid zip ({error})") from None
        except DataStageError as error:
            raise SourceError(str(error)) from None
        return Fetched(target, file_md5(target), f"repacked from Kaggle's {self.archive_name}, md5 {pinned} pinned in "
                               "download.pinned_md5.kaggle", {"kind": "repacked", "pin": ["kaggle", self.archive_name, pinned]})


class HuggingFaceSource(Source):
    """A Hugging Face Hub dataset repo with the official files, through ``huggingface_hub.hf_hub_download``
    (resumable ``.incomplete`` files, its own retries with backoff, progress bars; ``HF_TOKEN`` for gated repos).

    The endpoint is probed first with a plain TCP connection (retried with our backoff), so that with no network
    the source is given up at once instead of after the Hub client's own ~25 s of retries for every file.
    """

    name = "huggingface"
    pin_key = "huggingface"

    def describe(self) -> str:
        return f"huggingface ({self.config.huggingface_repo}@{self.config.huggingface_revision})"

    @property
    def endpoint(self) -> str:
        return (self.config.huggingface_endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
                ).rstrip("/")

    def _probe(self) -> None:
        import socket
        import urllib.parse
        import urllib.request

        url = urllib.parse.urlsplit(self.endpoint)
        host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
        if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
            return  # a proxy decides what is reachable
        try:
            for attempt in _retrying(self.config, f"huggingface connect {host}:{port}"):
                with attempt:
                    socket.create_connection((host, port), timeout=min(self.config.timeout_s, 10)).close()
        except OSError as error:
            self.unreachable = f"cannot reach {self.endpoint}: {_connection_problem(error, host)}"
            raise _SourceUnreachable(self.unreachable) from None

    def fetch(self, spec: RemoteFile) -> Fetched:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import hf_hub_download

        config = self.config
        repo = f"{config.huggingface_repo}@{config.huggingface_revision}"
        path_in_repo = f"{config.huggingface_subfolder.strip('/')}/{spec.name}".lstrip("/")
        self._probe()
        log.info("    huggingface: %s/datasets/%s/resolve/%s/%s", self.endpoint, config.huggingface_repo,
                 config.huggingface_revision, path_in_repo)
        try:
            path = Path(hf_hub_download(
                config.huggingface_repo, path_in_repo, repo_type="dataset", revision=config.huggingface_revision,
                local_dir=self.staging, endpoint=config.huggingface_endpoint, etag_timeout=config.timeout_s))
        except hf_errors.LocalEntryNotFoundError as error:  # the Hub client's word for "could not connect"
            status = _http_status(error)
            if status is not None:
                raise SourceError(f"HTTP {status} from {self.endpoint} for {repo}/{path_in_repo}") from None
            cause = next((e for e in _chain(error) if e is not error), error)
            raise SourceError(f"cannot download from {self.endpoint} ({_short(cause)})") from None
        except (hf_errors.RemoteEntryNotFoundError, hf_errors.EntryNotFoundError):
            raise SourceError(f"{repo} has no file {path_in_repo}") from None
        except hf_errors.GatedRepoError:
            raise SourceError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
        except hf_errors.RepositoryNotFoundError:
            raise SourceError(f"dataset repo {repo} not found (or private: set HF_TOKEN)") from None
        except hf_errors.RevisionNotFoundError:
            raise SourceError(f"{repo}: no such revision") from None
        except Exception as error:  # noqa: BLE001 - every failure of one source becomes a one-line reason
            status = _http_status(error)
            if status is not None:
                raise SourceError(f"HTTP {status} from the Hub for {repo}/{path_in_repo}") from None
            raise SourceError(f"{_short(error)}; the partial download is kept and resumed next time") from None
        return self.verify(path, spec)


class MirrorSource(_HttpSource):
    """A base URL holding the MNIST-family IDX ``.gz`` files (the usual S3/GCS mirrors)."""

    name = "mirror"
    pin_key = "mirror"

    def __init__(self, config: DownloadConfig, staging: Path, base_url: str, index: int):
        super().__init__(config, staging)
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.staging = staging / f"mirror{index}"

    def describe(self) -> str:
        return f"mirror {self.base_url}"

    def fetch(self, spec: RemoteFile) -> Fetched:
        target = self.staging / spec.name
        self._download(self.base_url + spec.name, target, spec.name)
        return self.verify(target, spec)


# -------------------------------------------------------------------------------------- the fetch loop


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

    def set(self, name: str, md5: str, source: str, verified_by: str, basis: dict[str, Any] | None = None) -> None:
        self.data["files"][name] = {"md5": md5, "source": source, "verified_by": verified_by}
        if basis:
            self.data["files"][name]["basis"] = basis

    def save(self) -> None:
        _atomic_write_text(self.path, json.dumps(self.data, indent=2, sort_keys=True) + "\n")


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
    """Is a verified copy of ``spec`` already at ``path``? Only if its md5 is the official one or one pinned in the
    current params (or its decompressed content is official, or it is a zip this stage rebuilt or repacked on a
    basis that still holds): a pin taken out of params.yaml no longer vouches for the file it once let in. A
    file that fails the check is deleted (and fetched again)."""
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


def _fetch_files(specs: list[RemoteFile], sources: list[Source], target: Path, record: SourcesRecord,
                 config: DownloadConfig, check: Callable[[RemoteFile, Path], None] | None = None
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
        raise DataStageError(f"{ds.CELEBA_PARTITION} lists {len(expected)} images, not {ds.CELEBA_IMAGE_COUNT}")
    zip_md5 = zip_md5 or file_md5(archive_path, f"md5 {ds.CELEBA_ZIP}")
    for stale in folder.glob(f".{ds.CELEBA_IMAGE_FOLDER}.partial-*"):
        _remove(stale)
    if out.is_dir():
        recorded = (out / marker).read_text().strip() if (out / marker).is_file() else None
        count = sum(1 for entry in os.scandir(out) if entry.name.endswith(".jpg"))
        if recorded == zip_md5 and count == len(expected):
            log.info("  %s/: %d images, extracted from this zip; nothing to do", ds.CELEBA_IMAGE_FOLDER, count)
            return out
        log.warning("  %s/ is stale or incomplete (%d images, from zip %s); extracting again",
                    ds.CELEBA_IMAGE_FOLDER, count, recorded)
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
        raise DataStageError(f"{archive_path}: corrupt zip ({error}); delete it and run the download again"
                             ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("  extracted %d images into %s", len(expected), out)
    return out


def _celeba_how_to(target: Path) -> str:
    names = ", ".join(ds.CELEBA_FILES)
    return (f"To provide a local copy: download {names} by hand (official Google Drive folder "
            f"{ds.CELEBA_DRIVE_FOLDER}, linked from {ds.CELEBA_HOMEPAGE}; a browser gets past Drive's quota and "
            "virus-scan pages), put them in one folder (or use a torchvision celeba/ folder), set "
            "download.local_dir to that folder in params.yaml, and run `dvc repro download` again. "
            "A mirror's copy that differs from the official md5 needs download.pinned_md5.<source>.<file>: <md5>. "
            f"Verified files already in {target} are kept.")


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
    failures = _fetch_files(list(ds.CELEBA_FILES.values()), sources, target, record, config,
                            check=_celeba_zip_check(target))
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

    Sources in order: the local folder (``download.<dataset>_local_dir``; ``.gz`` files, or uncompressed IDX files
    which are then gzipped), then each mirror URL. A file is accepted by the official md5 of the ``.gz``, or by
    the official md5 of its decompressed content (re-compressed copies such as Debian's), or a pin.

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
        hint = ("To provide a local copy: put the four files (" + ", ".join(files) + f") in a folder and set "
                f"download.{dataset}_local_dir to it in params.yaml"
                + (" (Debian/Ubuntu: `apt-get install dataset-fashion-mnist` puts them in "
                   "/usr/share/datasets/fashion-mnist)" if dataset == "fashion_mnist" else "")
                + ", then run `dvc repro download` again.")
        raise DataStageError(_failure_message(dataset, failures, raw_root, hint))
    shutil.rmtree(staging, ignore_errors=True)
    return raw_root


def download(data: DataConfig, config: DownloadConfig) -> Path:
    """Run the download stage for ``data.dataset``; returns its raw folder (``data.raw_path()``)."""
    raw_root = data.raw_path()
    if data.dataset == "celeba":
        download_celeba(config, raw_root)
    else:
        download_mnist_family(data.dataset, config, raw_root)
    return raw_root


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.download [--params PATH]``: exit status 0, or 1 with a clear message on stderr."""
    args = stage_argument_parser("pipeline.download", __doc__).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)

    def body() -> None:
        from pipeline.config import load_params

        params = load_params(args.params)
        download(params.data, params.download)

    return run_stage("download", body, interrupted="partial downloads are kept in data/raw/.downloads and resumed "
                                                   "by the next run")


if __name__ == "__main__":
    sys.exit(main())
