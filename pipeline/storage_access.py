"""Reaching object storage: the ``pyarrow.fs`` filesystem that serves a location (``s3://bucket/prefix``, any
URI pyarrow knows, or a local path) and how patiently it retries; a check that fails within seconds when a
location cannot be used; and the store's errors turned into a :class:`StorageError` that says what to fix
(the endpoint, the bucket, the credentials), so that a misconfigured store stops a stage at once with the fix
instead of after minutes of retries. What is read and written there is ``pipeline.storage``'s.

Through ``pyarrow.fs`` (the filesystem Ray Train itself writes checkpoints with), so one client library does
listing, ranged reads and multipart uploads. Settings:

- the endpoint of an S3-compatible store (MinIO, Ceph, GCS's XML API, the local cluster's moto server):
  ``cluster.s3_endpoint_url`` in params.yaml, else the standard ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL`` environment variables, else AWS itself;
- credentials: only the standard AWS sources (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a profile,
  an instance role). They are never read from params.yaml and never logged.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.common import StageError, say

# A checkpoint or output upload outlives an outage of the store of about this long: the AWS SDK's standard
# retry strategy (exponential backoff with jitter, at most 20 s between tries) with these many attempts and a
# request timeout of REQUEST_TIMEOUT_S per try.
PATIENT_ATTEMPTS = 12
REQUEST_TIMEOUT_S = 10.0


@functools.cache
def _patient_s3_filesystem_class():
    """pyarrow's ``S3FileSystem`` with a ``__reduce__`` that keeps every option it was made with.

    pyarrow's own ``__reduce__`` rebuilds the filesystem without its ``retry_strategy``, so a filesystem that
    crosses a process boundary (Ray pickles ``RunConfig.storage_filesystem`` to the Train controller and the
    workers) falls back to three quick attempts: a store that refuses connections for a few seconds (an
    endpoint restarting) then fails the controller's checkpoint bookkeeping, which no FailureConfig retries.
    Defined lazily: importing pyarrow.fs costs time in stages that never touch a store.
    """
    import pyarrow.fs as pafs

    class PatientS3FileSystem(pafs.S3FileSystem):
        def __init__(self, **options: Any) -> None:
            super().__init__(**options)
            self.options = options

        def __reduce__(self):
            return _rebuild_s3_filesystem, (self.options,)

    return PatientS3FileSystem


def _rebuild_s3_filesystem(options: dict[str, Any]):
    """Unpickle a filesystem made by :func:`filesystem` with every option (credentials come from the standard
    AWS sources of the process that unpickles it, as with pyarrow's own pickling)."""
    return _patient_s3_filesystem_class()(**options)


class StorageError(StageError):
    """Object storage is unreachable, refuses the credentials, lacks the bucket, or holds data that do not
    match their manifest; the message says which and what to fix."""


def is_uri(location: Path | str | None) -> bool:
    """Whether ``location`` is a URI (``s3://...``) rather than a local path."""
    return location is not None and "://" in str(location)


def endpoint_url(configured: str | None = None) -> str | None:
    """The S3 endpoint: ``configured`` (``cluster.s3_endpoint_url``), else ``AWS_ENDPOINT_URL_S3`` /
    ``AWS_ENDPOINT_URL``, else None (AWS)."""
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(location: str, endpoint: str | None = None, patient: bool = True):
    """The ``pyarrow.fs`` filesystem of ``location`` and the path on it.

    Args:
        location: a local path or a URI (``s3://bucket/prefix``, ``gs://...``).
        endpoint: an S3-compatible endpoint URL (see :func:`endpoint_url`); used for ``s3://`` only.
        patient: retry for about a minute (checkpoint and output writes, which must survive an outage of the
            store); False fails within seconds (the checks of :func:`check_location`).

    Returns:
        ``(pyarrow.fs.FileSystem, path)``: for S3 the path is ``bucket/prefix`` without the scheme.
    """
    import pyarrow.fs as pafs

    text = str(location)
    if not is_uri(text):
        return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())
    parsed = urlparse(text)
    if parsed.scheme in ("s3", "s3a"):
        path = (parsed.netloc + parsed.path).rstrip("/")
        options: dict[str, Any] = {
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(
                max_attempts=PATIENT_ATTEMPTS if patient else 1
            ),
            "connect_timeout": 5.0 if patient else 2.0,
            "request_timeout": REQUEST_TIMEOUT_S if patient else 5.0,
        }
        endpoint = endpoint_url(endpoint)
        if endpoint:
            scheme, _, host = endpoint.partition("://")
            options.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options["region"] = region
        return _patient_s3_filesystem_class()(**options), path
    fs, path = pafs.FileSystem.from_uri(text)
    return fs, path.rstrip("/")


def check_location(location: str, endpoint: str | None = None, what: str = "storage") -> None:
    """Fail within seconds, with the fix in the message, when ``location`` cannot be listed: the endpoint does
    not answer, the credentials are refused, or the bucket does not exist. Local paths pass.

    Raises:
        StorageError: naming the endpoint, bucket or credentials to fix.
    """
    if not is_uri(location):
        return
    import pyarrow.fs as pafs

    fs, path = filesystem(location, endpoint, patient=False)
    started = time.monotonic()
    try:
        fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
        bucket = path.split("/", 1)[0]
        is_s3 = urlparse(location).scheme in ("s3", "s3a")
        if is_s3 and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise OSError(f"NO_SUCH_BUCKET: {bucket}")
    except OSError as error:
        raise StorageError(_explain(error, location, endpoint, what)) from None
    except Exception as error:  # noqa: BLE001 - pyarrow raises ArrowInvalid etc. for malformed settings
        raise StorageError(f"{what} {location}: {error}") from None
    if time.monotonic() - started > 10:
        say(f"[storage] {location} answered slowly ({time.monotonic() - started:.0f} s)")


def _explain(error: Exception, location: str, endpoint: str | None, what: str) -> str:
    text = str(error)
    where = endpoint_url(endpoint) or "AWS S3"
    bucket = urlparse(location).netloc
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return (f"{what} {location}: bucket {bucket!r} does not exist at {where}; create it "
                f"(`aws s3 mb s3://{bucket}`) or fix the URI")
    if any(code in text for code in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId",
                                     "SignatureDoesNotMatch", "SIGNATURE_DOES_NOT_MATCH", "HTTP status 403",
                                     "INVALID_ACCESS_KEY")):
        return (f"{what} {location}: {where} refused the credentials ({text.splitlines()[0][:200]}); set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) to a key that may use "
                f"bucket {bucket!r}")
    if any(hint in text for hint in ("curlCode", "NETWORK_CONNECTION", "Couldn't connect", "resolve host",
                                     "Connection refused", "Timeout")):
        return (f"{what} {location}: no S3 endpoint answers at {where} ({text.splitlines()[0][:200]}); fix "
                "cluster.s3_endpoint_url / AWS_ENDPOINT_URL, or start the store (infra/local-cluster.sh up "
                "--team)")
    return f"{what} {location}: {text.splitlines()[0][:300]}"


@contextlib.contextmanager
def _explained(location: str, endpoint: str | None, what: str) -> Iterator[None]:
    """Turn the store's errors into FileNotFoundError (missing object) or a StorageError that says what to
    fix (endpoint, bucket, credentials)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as error:
        if _not_found(error):
            raise FileNotFoundError(location) from None
        if not is_uri(location):
            raise
        raise StorageError(_explain(error, location, endpoint, what)) from None


def _not_found(error: OSError) -> bool:
    return "NO_SUCH_KEY" in str(error) or "does not exist" in str(error)
