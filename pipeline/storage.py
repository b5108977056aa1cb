"""Object storage: ``s3://bucket/prefix`` (and any URI pyarrow knows: ``gs://``, ``hdfs://``) wherever a
cluster needs storage that every node reaches without a shared filesystem - the preprocessed arrays
(``data.processed_dir``), Ray Train's checkpoints (``train.storage_path``) and each run's stage outputs.

Through ``pyarrow.fs`` (the filesystem Ray Train itself writes checkpoints with), so one client library does
listing, ranged reads and multipart uploads. Settings:

- the endpoint of an S3-compatible store (MinIO, Ceph, GCS's XML API, the local cluster's moto server):
  ``cluster.s3_endpoint_url`` in params.yaml, else the standard ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL`` environment variables, else AWS itself;
- credentials: only the standard AWS sources (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, a profile,
  an instance role). They are never read from params.yaml and never logged.

Node-local data cache (:func:`local_dataset`): each process that reads a dataset from object storage copies
its arrays into ``VAE_DATA_CACHE`` (default ``~/.cache/vae-pipeline``; one per node), verifies every file
against the manifest's sha256 (a corrupted or stale cached file is fetched again) and memory-maps the local
copy; a second run on the same node reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.common import StageError, atomic_output, say

MANIFEST = "manifest.json"
# A checkpoint or output upload outlives an outage of the store of about this long: the AWS SDK's standard
# retry strategy (exponential backoff with jitter, at most 20 s between tries) with these many attempts and a
# request timeout of REQUEST_TIMEOUT_S per try.
PATIENT_ATTEMPTS = 12
REQUEST_TIMEOUT_S = 10.0
_CHUNK = 8 * 1024 * 1024


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
        return pafs.S3FileSystem(**options), path
    fs, path = pafs.FileSystem.from_uri(text)
    return fs, path.rstrip("/")


def join(location: str, *parts: str) -> str:
    """``location``/part/... for a path or a URI."""
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


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


# --------------------------------------------------------------------------------------------- files
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


def read_bytes(location: str, endpoint: str | None = None, patient: bool = True) -> bytes:
    """The whole content of one file (path or URI); ``patient=False`` fails within seconds when the store does
    not answer (see :func:`filesystem`).

    Raises:
        FileNotFoundError: it does not exist.
        StorageError: the store refused (the message says what to fix).
    """
    fs, path = filesystem(location, endpoint, patient=patient)
    with _explained(location, endpoint, "reading"), fs.open_input_stream(path) as handle:
        return handle.read()


def _not_found(error: OSError) -> bool:
    return "NO_SUCH_KEY" in str(error) or "does not exist" in str(error)


def write_bytes(location: str, data: bytes, endpoint: str | None = None) -> None:
    """Write one file. Local: atomically (temporary file + rename). S3: a PUT (or multipart upload) becomes
    visible only when complete, so a reader never sees part of it."""
    if not is_uri(location):
        with atomic_output(location) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(location, endpoint)
    with _explained(location, endpoint, "writing"), fs.open_output_stream(path) as handle:
        handle.write(data)


def upload_file(source: Path, location: str, endpoint: str | None = None) -> None:
    """Copy one local file to ``location`` (path or URI), streaming (multipart on S3); complete or absent."""
    if not is_uri(location):
        with atomic_output(location) as tmp, open(source, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
        return
    fs, path = filesystem(location, endpoint)
    with (
        _explained(location, endpoint, "writing"),
        open(source, "rb") as src,
        fs.open_output_stream(path) as dst,
    ):
        while chunk := src.read(_CHUNK):
            dst.write(chunk)


def download_file(
    location: str, target: Path, endpoint: str | None = None, sha256: str | None = None
) -> None:
    """Copy ``location`` to the local file ``target`` atomically; with ``sha256``, verify it first.

    Raises:
        FileNotFoundError: ``location`` does not exist.
        StorageError: the copy's sha256 differs (nothing is written).
    """
    fs, path = filesystem(location, endpoint)
    digest = hashlib.sha256()
    with atomic_output(target) as tmp:
        with (
            _explained(location, endpoint, "reading"),
            fs.open_input_stream(path) as src,
            open(tmp, "wb") as dst,
        ):
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
        if sha256 and digest.hexdigest() != sha256:
            raise StorageError(
                f"{location}: sha256 {digest.hexdigest()[:16]}... differs from the manifest's "
                f"{sha256[:16]}...; the stored data are damaged or half-published: run the preprocess stage "
                "again to re-publish them"
            )


def list_files(location: str, endpoint: str | None = None) -> list[str]:
    """Every file under ``location`` (recursive), as paths relative to it; [] when it does not exist."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location, endpoint)
    with _explained(location, endpoint, "listing"):
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return sorted(i.path[len(path):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------- the data cache
def cache_root() -> Path:
    """This node's cache: ``VAE_DATA_CACHE``, else ``~/.cache/vae-pipeline``."""
    return Path(os.environ.get("VAE_DATA_CACHE") or Path.home() / ".cache" / "vae-pipeline").expanduser()


def cache_folder(location: str) -> Path:
    """The node-local folder that mirrors the dataset at URI ``location``."""
    parsed = urlparse(location)
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{parsed.netloc}{parsed.path}").strip("_")[-80:]
    return cache_root() / "data" / f"{readable}-{hashlib.sha256(location.encode()).hexdigest()[:8]}"


@contextlib.contextmanager
def _node_lock(folder: Path) -> Iterator[None]:
    """One process per node fills a cache folder at a time (several Train workers share a node)."""
    from filelock import FileLock

    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        yield


def manifest_files(manifest: dict[str, Any]) -> dict[str, str]:
    """``{file name: sha256}`` of every array a preprocess manifest lists."""
    return {name: digest for info in manifest.get("splits", {}).values()
            for name, digest in (info.get("files") or {}).items()}


def local_dataset(location: Path | str, endpoint: str | None = None, _retried: bool = False) -> Path:
    """A local folder with the preprocessed dataset at ``location``: the folder itself for a local path; for a
    URI, this node's cached copy, brought up to date.

    Every cached array is checked against the sha256 in the store's manifest.json; a missing, stale or
    corrupted one is downloaded again (to a temporary file, verified, then renamed), so a half-written cache
    is never used. The manifest is written last. When a publish replaces the dataset while this reads it
    (the arrays of the manifest read are gone), the new manifest is read once more (``_retried``).

    Raises:
        StorageError: the store is unreachable or its data do not match their manifest.
        FileNotFoundError: no manifest.json at ``location`` (the message says to run the preprocess stage).
    """
    if not is_uri(location):
        return Path(location)
    location = str(location)
    check_location(location, endpoint, "data.processed_dir")
    try:
        manifest_bytes = read_bytes(join(location, MANIFEST), endpoint)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{join(location, MANIFEST)} does not exist: publish the preprocessed data there (`python -m "
            f"pipeline.preprocess` with data.processed_dir set to the bucket's prefix)"
        ) from None
    manifest = json.loads(manifest_bytes)
    folder = cache_folder(location)
    fetched, reused = [], []
    with _node_lock(folder):
        folder.mkdir(parents=True, exist_ok=True)
        for name, digest in sorted(manifest_files(manifest).items()):
            target = folder / name
            if target.is_file() and sha256_file(target) == digest:
                reused.append(name)
                continue
            if target.exists():
                say(f"[storage] cached {target} differs from the manifest: fetching it again")
            try:
                _download_array(location, name, digest, target, endpoint)
            except FileNotFoundError:
                if _retried:  # gone twice: not a publish racing this read
                    raise
                gone = name
                break
            fetched.append(name)
        else:
            gone = None
        cached_manifest = folder / MANIFEST
        if gone is None and (not cached_manifest.is_file() or cached_manifest.read_bytes() != manifest_bytes):
            with atomic_output(cached_manifest) as tmp:
                tmp.write_bytes(manifest_bytes)
    if gone is not None:  # a publish replaced the manifest read above and removed its arrays: read anew
        say(f"[storage] {location}: {gone} was replaced while this node read it; reading the new manifest")
        return local_dataset(location, endpoint, _retried=True)
    if fetched:
        say(f"[storage] {location}: fetched {len(fetched)} file(s) into {folder}, reused {len(reused)}")
    return folder


# Published arrays live under a key of their content, <location>/arrays/<sha256>/<name>: a publish never
# overwrites an object that a reader of the previous manifest may be fetching.
ARRAYS = "arrays"


def array_key(name: str, digest: str) -> str:
    """Where :func:`publish_dataset` puts the array ``name`` with content ``digest``, relative to the
    dataset's location."""
    return f"{ARRAYS}/{digest}/{name}"


def _download_array(location: str, name: str, digest: str, target: Path, endpoint: str | None) -> None:
    """Fetch one array of a published dataset, verified: its content-addressed key, or the plain name under
    which datasets published before content addressing keep it."""
    try:
        download_file(join(location, array_key(name, digest)), target, endpoint, sha256=digest)
    except FileNotFoundError:
        download_file(join(location, name), target, endpoint, sha256=digest)


def publish_dataset(folder: Path, location: str, endpoint: str | None = None) -> None:
    """Upload a preprocessed dataset folder to ``location``: every array under its content's key
    (:func:`array_key`; one already there is not sent again), then manifest.json in one write, then the
    arrays only the previous manifest listed. A reader always finds the arrays of the manifest it read: the
    old ones stay until the new manifest is in place, and a reader that read the old manifest just before
    they went reads the new one (:func:`local_dataset`)."""
    manifest = json.loads((folder / MANIFEST).read_text())
    check_location(location, endpoint, "data.processed_dir")
    wanted = {array_key(name, digest) for name, digest in manifest_files(manifest).items()}
    present = set(list_files(join(location, ARRAYS), endpoint))
    for name, digest in sorted(manifest_files(manifest).items()):
        if array_key(name, digest).removeprefix(f"{ARRAYS}/") not in present:
            upload_file(folder / name, join(location, array_key(name, digest)), endpoint)
    upload_file(folder / MANIFEST, join(location, MANIFEST), endpoint)
    stale = [f"{ARRAYS}/{key}" for key in present if f"{ARRAYS}/{key}" not in wanted]
    fs, root = filesystem(location, endpoint)
    for key in stale:
        with contextlib.suppress(FileNotFoundError), _explained(location, endpoint, "deleting"):
            fs.delete_file(f"{root}/{key}")
    say(f"[storage] published {folder} to {location}" + (f" ({len(stale)} old array(s) removed)" if stale
                                                          else ""))


def upload_tree(root: Path, relative: list[Path], location: str, endpoint: str | None = None) -> list[str]:
    """Upload the files (and folders' files) ``relative`` to ``root`` under ``location``, keeping their
    relative paths; returns the uploaded relative paths."""
    done = []
    for item in relative:
        source = root / item
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for path in files:
            if not path.is_file() or path.name.startswith("."):
                continue
            rel = path.relative_to(root).as_posix()
            upload_file(path, join(location, rel), endpoint)
            done.append(rel)
    return done


def download_tree(location: str, root: Path, endpoint: str | None = None) -> list[str]:
    """Download every file under ``location`` into ``root`` (same relative paths); returns them."""
    done = []
    for rel in list_files(location, endpoint):
        download_file(join(location, rel), root / rel, endpoint)
        done.append(rel)
    return done


def scratch_folder(location: str) -> Path:
    """A fresh local folder to build a dataset in before :func:`publish_dataset` (in this node's cache)."""
    root = cache_root() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=cache_folder(location).name + "-"))
