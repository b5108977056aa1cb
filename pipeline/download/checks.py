"""What the download stage checks and how it retries: md5 sums, HTML pages served instead of files, transient
network errors (tenacity backoff), CelebA image names, and the pin that accepts a mirror's differing copy."""

from __future__ import annotations

import gzip
import hashlib
import logging
import re
import shutil
import stat
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tenacity
from tqdm.auto import tqdm

from pipeline import datasets as ds
from pipeline.common import atomic_output
from pipeline.datasets import DataStageError

if TYPE_CHECKING:
    from pipeline.config import DownloadConfig

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
    with (
        open(path, "rb") as handle,
        _bytes_bar(size, label or f"md5 {path.name}", size >= _PROGRESS_MIN_BYTES) as bar,
    ):
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
    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        disable=None if enabled else True,
    )


_HTML_KINDS: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("quota exceeded", "too many users have viewed or downloaded", "download quota"),
        "Google Drive's 'download quota exceeded' page (too "
        "many downloads of this file in the last 24 hours; "
        "try again tomorrow or fetch it by hand)",
    ),
    (
        ("virus scan warning", "scan this file for viruses", "uc-warning-caption"),
        "Google Drive's virus-scan warning page (a large file "
        "needs a confirmation the client could not complete)",
    ),
    (
        (
            "accounts.google.com",
            "servicelogin",
            "sign in",
            "sign-in",
            "log in",
            "login",
            "403 forbidden",
            "unauthorized",
        ),
        "a login or access-denied page (the file is private, gated or needs credentials)",
    ),
)


def describe_html(head: bytes) -> str | None:
    """If ``head`` (the first bytes of a download) is an HTML/XML page rather than data, say what page it is.

    Returns None for anything that does not start like a web page (zip, gzip, text annotations).
    """
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<?xml") and b"<error>" in text:
        code = re.search(rb"<code>([^<]{1,80})</code>", text)
        detail = (code.group(1) if code else b"error").decode(errors="replace")
        return f"an XML error page from the server ({detail})"
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


_NO_DNS = (
    "name or service not known",
    "temporary failure in name resolution",
    "nodename nor servname",
    "failed to resolve",
    "getaddrinfo failed",
    "no address associated",
)


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
    return name.endswith(
        ("ConnectError", "TimeoutException", "ReadError", "RemoteProtocolError", "ReadTimeout")
    )


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
        log.warning(
            "    %s: attempt %d failed (%s); retrying in %.1f s (partial data is kept and resumed)",
            what,
            state.attempt_number,
            _short(error) if error else "?",
            state.next_action.sleep,
        )

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
    size = src.stat().st_size
    with (
        atomic_output(dst) as tmp,
        open(src, "rb") as fin,
        open(tmp, "wb") as fout,
        _bytes_bar(size, f"copy {src.name}", size >= _PROGRESS_MIN_BYTES) as bar,
    ):
        for block in iter(lambda: fin.read(_CHUNK), b""):
            digest.update(block)
            fout.write(block)
            bar.update(len(block))
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
        detail.append(
            f"{len(missing)} listed in {ds.CELEBA_PARTITION} are missing (e.g. {', '.join(missing[:3])})"
        )
    if extra:
        detail.append(f"{len(extra)} are not listed there (e.g. {', '.join(extra[:3])})")
    raise DataStageError(
        f"{what} has {len(found)} images but {ds.CELEBA_PARTITION} lists {len(wanted)}: " + "; ".join(detail)
    )


def _write_celeba_zip(images: dict[str, Callable[[], Any]], out: Path) -> None:
    """Write an ``img_align_celeba.zip`` in the official layout from ``{name: open-function}`` (reproducibly:
    sorted entries, fixed timestamps, stored uncompressed since JPEGs do not compress)."""
    with (
        atomic_output(out) as tmp,
        zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive,
    ):
        folder = zipfile.ZipInfo(ds.CELEBA_IMAGE_FOLDER + "/", date_time=_ZIP_DATE)
        folder.external_attr = (stat.S_IFDIR | 0o755) << 16
        archive.writestr(folder, b"")
        for name in tqdm(sorted(images), desc=f"pack {out.name}", unit="img", leave=False, disable=None):
            info = zipfile.ZipInfo(f"{ds.CELEBA_IMAGE_FOLDER}/{name}", date_time=_ZIP_DATE)
            info.external_attr = (stat.S_IFREG | 0o644) << 16
            with images[name]() as source, archive.open(info, "w", force_zip64=True) as target:
                shutil.copyfileobj(source, target, _CHUNK)
