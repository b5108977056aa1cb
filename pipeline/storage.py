"""Object storage: ``s3://bucket/prefix`` (and any URI pyarrow knows: ``gs://``, ``hdfs://``) wherever a
cluster needs storage that every node reaches without a shared filesystem - the preprocessed arrays
(``data.processed_dir``), Ray Train's checkpoints (``train.storage_path``) and each run's stage outputs:
files and folders read, written and listed there, and the published datasets. Reaching the store (the
filesystem of a location, its endpoint and credentials, the quick check, errors that say what to fix) is
``pipeline.storage_access``'s.

Node-local data cache (:func:`local_dataset`): each process that reads a dataset from object storage copies
its arrays into ``VAE_DATA_CACHE`` (default ``~/.cache/vae-pipeline``; one per node), verifies every file
against the manifest's sha256 (a corrupted or stale cached file is fetched again) and memory-maps the local
copy; a second run on the same node reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.common import atomic_output, resolve, say
from pipeline.storage_access import StorageError, _explained, check_location, filesystem, is_uri

MANIFEST = "manifest.json"
_CHUNK = 8 * 1024 * 1024


def join(location: str, *parts: str) -> str:
    """``location``/part/... for a path or a URI."""
    return "/".join([str(location).rstrip("/"), *(p.strip("/") for p in parts)])


# Every stream is opened with compression=None: pyarrow's default ("detect") would gzip a ``.gz`` file again
# on its way up and unzip it on its way down, so a stored object would not be the file (MNIST's raw files).


def storage_location(storage_path: str | Path) -> str:
    """Run storage (``train.storage_path``): an absolute path (relative: project root) or a URI as is."""
    return str(storage_path) if is_uri(str(storage_path)) else str(resolve(storage_path))


# --------------------------------------------------------------------------------------------- files
def read_bytes(location: str, endpoint: str | None = None, patient: bool = True) -> bytes:
    """The whole content of one file (path or URI); ``patient=False`` fails within seconds when the store does
    not answer (see :func:`filesystem`).

    Raises:
        FileNotFoundError: it does not exist.
        StorageError: the store refused (the message says what to fix).
    """
    fs, path = filesystem(location, endpoint, patient=patient)
    with _explained(location, endpoint, "reading"), fs.open_input_stream(path, compression=None) as handle:
        return handle.read()


def write_bytes(location: str, data: bytes, endpoint: str | None = None) -> None:
    """Write one file. Local: atomically (temporary file + rename). S3: a PUT (or multipart upload) becomes
    visible only when complete, so a reader never sees part of it."""
    if not is_uri(location):
        with atomic_output(location) as tmp:
            tmp.write_bytes(data)
        return
    fs, path = filesystem(location, endpoint)
    with _explained(location, endpoint, "writing"), fs.open_output_stream(path, compression=None) as handle:
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
        fs.open_output_stream(path, compression=None) as dst,
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
            fs.open_input_stream(path, compression=None) as src,
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


def safe_member_path(folder: Path, name: str) -> Path:
    """``folder / name`` for a file name that comes from the store (a manifest's array name, a listed key),
    checked to stay inside ``folder``: write access to the bucket must not let anyone write files elsewhere
    on a node (a shell profile, a ``.pth`` file in the virtual environment: code execution).

    Refused: an empty name; an absolute one (``/tmp/x``); one with a ``..``, ``.`` or empty component
    (``../x``, ``a/../../x``, ``a//x``); one with a backslash or a NUL; and one whose path under ``folder``
    passes through an existing symlink that leads out of ``folder`` (a link planted in the cache). Only
    looks: creates and writes nothing.

    Raises:
        StorageError: the name is refused; the message names it, ``folder`` and the reason.
    """
    parts = name.split("/") if isinstance(name, str) else []
    if not isinstance(name, str) or not name:
        reason = "an empty name"
    elif "\x00" in name:
        reason = "it contains a NUL byte"
    elif "\\" in name:
        reason = "it contains a backslash"
    elif name.startswith("/"):
        reason = "an absolute path"
    elif any(part in ("", ".", "..") for part in parts):
        reason = "a '..', '.' or empty path component"
    else:
        target = Path(folder).joinpath(*parts)
        try:
            resolved = target.resolve()
            inside = resolved.is_relative_to(Path(folder).resolve())
        except (OSError, RuntimeError):  # a symlink loop
            resolved, inside = None, False
        if inside:
            return target
        reason = f"a symlink on its way leads to {resolved or 'a symlink loop'}"
    raise StorageError(f"{name!r} would be written outside {folder} ({reason})")


def manifest_files(manifest: dict[str, Any]) -> dict[str, str]:
    """``{file name: sha256}`` of every array a preprocess manifest lists."""
    return {name: digest for info in manifest.get("splits", {}).values()
            for name, digest in (info.get("files") or {}).items()}


def check_cache_space(manifest: dict[str, Any], folder: Path, location: str) -> None:
    """Refuse, before a byte is fetched, a dataset that this node's data cache cannot hold.

    The arrays need ``images x C x H x W`` bytes (uint8): 12,288 per image at 64 px, 49,152 at 128, 196,608
    at 256 (README, "Bigger than a node"). What the cache already holds of them counts as present.

    Raises:
        StorageError: the arrays need more than the free space of the cache's disk; the message gives the
            sizes and the ways out.
    """
    shape = [int(side) for side in manifest.get("image_shape") or []]
    per_image = math.prod(shape) if shape else 0
    count = sum(int(info.get("count", 0)) for info in manifest.get("splits", {}).values())
    needed = count * per_image
    present = sum(path.stat().st_size for path in folder.glob("*_images.npy") if path.is_file())
    free = shutil.disk_usage(folder).free
    if needed - present > free:
        raise StorageError(
            f"{location}: {count:,} images of {'x'.join(map(str, shape))} need {needed / 1e9:.1f} GB in "
            f"this node's data cache {folder} ({per_image:,} bytes per image), and its disk has "
            f"{free / 1e9:.1f} GB free; nothing was fetched. Free space or set VAE_DATA_CACHE to a larger "
            "disk on every node, lower data.image_size, or train on a subset. Training reads a node-local "
            "copy; a dataset larger than a node's disk needs the arrays streamed from the store into the "
            "workers instead, which this pipeline does not do (README, \"Bigger than a node\")"
        )


def local_dataset(location: Path | str, endpoint: str | None = None, _retried: bool = False) -> Path:
    """A local folder with the preprocessed dataset at ``location``: the folder itself for a local path; for a
    URI, this node's cached copy, brought up to date.

    Every cached array is checked against the sha256 in the store's manifest.json; a missing, stale or
    corrupted one is downloaded again (to a temporary file, verified, then renamed), so a half-written cache
    is never used. The manifest is written last. When a publish replaces the dataset while this reads it
    (the arrays of the manifest read are gone), the new manifest is read once more (``_retried``). Every
    array name is checked (:func:`safe_member_path`) before anything is fetched: a manifest that names a
    file outside the cache folder is refused whole.

    Raises:
        StorageError: the store is unreachable, its data do not match their manifest, the manifest names
            a file outside the cache folder, or the arrays do not fit this node's disk
            (:func:`check_cache_space`; nothing is written).
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
        check_cache_space(manifest, folder, location)
        try:  # every name checked before the first byte is written
            files = [(name, digest, safe_member_path(folder, name))
                     for name, digest in sorted(manifest_files(manifest).items())]
        except StorageError as error:
            raise StorageError(
                f"{join(location, MANIFEST)} lists the array {error}: refused, nothing was written. The "
                f"dataset at {location} was not written by this pipeline's preprocess stage: re-publish it "
                "with `python -m pipeline.preprocess` (data.processed_dir set to the bucket's prefix)"
            ) from None
        for name, digest, target in files:
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
    """Download every file under ``location`` into ``root`` (same relative paths); returns them.

    Every listed key is checked (:func:`safe_member_path`) before the first file is written: a key that
    would land outside ``root`` (``..`` components, a symlink that leads out) is refused, and nothing is
    written.

    Raises:
        StorageError: a listed key would land outside ``root``, or the store refused.
    """
    files = []
    for rel in list_files(location, endpoint):
        try:
            files.append((rel, safe_member_path(root, rel)))
        except StorageError as error:
            raise StorageError(
                f"{join(location, rel)}: the key {error}: refused, nothing was written. The objects under "
                f"{location} were not all written by this pipeline (the stages save their outputs with "
                "relative paths under the project root): delete that object from the store and run the stage "
                "again"
            ) from None
    for rel, target in files:
        download_file(join(location, rel), target, endpoint)
    return [rel for rel, _ in files]


def scratch_folder(location: str) -> Path:
    """A fresh local folder to build a dataset in before :func:`publish_dataset` (in this node's cache)."""
    root = cache_root() / "staging"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=root, prefix=cache_folder(location).name + "-"))
