"""moto's S3 server made safe and durable: ``python -m infra.cluster.s3_server -H HOST -p PORT --keys-file F
--store DIR``.

Three changes to moto's standalone server (``python -m moto.server``), which is meant for tests:

- **No admin API.** moto also serves ``/moto-api/``, unauthenticated: ``GET /moto-api/data.json`` returns
  every backend's state (the IAM user's secret access key among it), ``POST /moto-api/reset-auth`` turns
  request signing off and ``POST /moto-api/reset`` wipes every bucket. A WSGI filter answers 403 to any
  request for that API - by path (any path with a ``moto-api`` segment, however spelled with extra slashes or
  dots) or by its host name (``motoapi.amazonaws.com``) - before moto sees it.
- **One key pair, from a file, and every request signed.** The IAM user and its key pair (read from
  ``--keys-file``, a 0600 JSON file with ``aws_access_key_id`` / ``aws_secret_access_key``: never on the
  command line) are created inside the process before it listens, and signing is enforced from the first
  request (``INITIAL_NO_AUTH_ACTION_COUNT=0``): there is no unsigned provisioning call for anyone to race.
  A restart with the same file keeps the key, so running jobs go on with the credentials they hold.
- **Durable objects.** moto keeps objects in memory; this server writes each object it stores through to
  ``--store`` (one file per object, written to a temporary name, fsynced, renamed) and removes the deleted
  ones, *before* it answers the request, and loads the folder when it starts. An acknowledged write survives
  SIGKILL of the server; a restart serves exactly the acknowledged objects (with their metadata and ETags).

Everything else (S3 as moto implements it) is moto's, unchanged.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import posixpath
import shutil
import signal
import sys
import threading
from pathlib import Path
from typing import Any

ADMIN_PATH_SEGMENT = "moto-api"
ADMIN_HOST = "motoapi."
USER = "vae-pipeline"
# The user may do anything moto knows; moto does not evaluate an IAM policy's Resource, so the bucket-scoped
# policy a real store would get (s3_endpoint.BUCKET_POLICY) cannot be enforced here (infra/README.md).
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
MUTATING_METHODS = frozenset({"PUT", "POST", "DELETE"})


def is_admin_request(environ: dict[str, Any]) -> bool:
    """Whether a WSGI request would reach moto's admin API (``/moto-api/...`` or its host name)."""
    path = posixpath.normpath("/" + environ.get("PATH_INFO", "").replace("\\", "/")).lower()
    host = environ.get("HTTP_HOST", "").lower()
    return ADMIN_PATH_SEGMENT in path.split("/") or host.startswith(ADMIN_HOST)


class WithoutAdminApi:
    """WSGI middleware: 403 for :func:`is_admin_request`, else the wrapped application."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if is_admin_request(environ):
            body = b"moto's admin API is not served by this S3 endpoint\n"
            start_response(
                "403 Forbidden", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
            )
            return [body]
        return self.app(environ, start_response)


class ObjectStore:
    """The objects of every bucket on disk: ``<root>/<bucket>/<sha256 of the key>``, each file one JSON
    header line (key, metadata, ETag, last-modified time) and then the object's bytes.

    Keys are hashed because S3 keys are not paths (``a/`` and ``a/b`` may both be objects, ``..`` is a valid
    key); a bucket is a folder whose name S3's naming rules keep path-safe.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, bucket: str, key: str) -> Path:
        return self.root / bucket / hashlib.sha256(key.encode()).hexdigest()

    def write(self, bucket: str, key: str, value: bytes, header: dict[str, Any]) -> None:
        """Store one object atomically and durably (temporary file, fsync, rename, fsync of the folder)."""
        target = self.path(bucket, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(json.dumps({"key": key, **header}).encode() + b"\n")
            handle.write(value)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(target)
        self._sync_folder(target.parent)

    def remove(self, bucket: str, key: str) -> None:
        target = self.path(bucket, key)
        if target.exists():
            target.unlink()
            self._sync_folder(target.parent)

    def buckets(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def objects(self, bucket: str):
        """Yield ``(header, value)`` of every object stored for ``bucket`` (interrupted writes skipped)."""
        for path in sorted((self.root / bucket).iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            with open(path, "rb") as handle:
                header = json.loads(handle.readline())
                yield header, handle.read()

    @staticmethod
    def _sync_folder(folder: Path) -> None:
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


class DurableBuckets:
    """Writes moto's in-memory objects through to an :class:`ObjectStore` before each request is answered.

    moto's S3 backend methods that create or remove objects and buckets (``put_object`` - also behind copies
    and completed multipart uploads -, ``delete_object`` - also behind DeleteObjects -, ``create_bucket``,
    ``delete_bucket``) are wrapped to note what they touched in the request's thread; once moto has built the
    response, :meth:`__call__` stores the final state of each noted object (metadata included) and only then
    lets the response go. One lock orders the flushes, so the last flush of a key stores its newest state.
    """

    def __init__(self, app: Any, store: ObjectStore, backend: Any) -> None:
        self.app, self.store, self.backend = app, store, backend
        self.touched = threading.local()
        self.lock = threading.Lock()
        self._wrap(backend)

    def _note(self, bucket: str, key: str | None) -> None:
        noted = getattr(self.touched, "names", None)
        if noted is not None:
            noted.add((bucket, key))

    def _wrap(self, backend: Any) -> None:
        import inspect

        for name, has_key in (("put_object", True), ("delete_object", True), ("create_bucket", False),
                              ("delete_bucket", False)):
            original = getattr(backend, name)
            signature = inspect.signature(original)

            def call(*args: Any, _original=original, _signature=signature, _has_key=has_key, **kwargs: Any):
                result = _original(*args, **kwargs)
                named = _signature.bind(*args, **kwargs).arguments
                self._note(named["bucket_name"], named["key_name"] if _has_key else None)
                return result

            setattr(backend, name, call)

    def load(self) -> int:
        """Put every stored object back into moto (at start, before listening); returns the count."""
        count = 0
        for bucket in self.store.buckets():
            if bucket not in self.backend.buckets:
                self.backend.create_bucket(bucket, "us-east-1")
            for header, value in self.store.objects(bucket):
                stored = self.backend.put_object(bucket, header["key"], value, etag=header.get("etag"))
                stored.set_metadata(dict(header.get("metadata", {})))
                if header.get("last_modified"):
                    stored.last_modified = datetime.datetime.fromisoformat(header["last_modified"])
                count += 1
        return count

    def flush(self, names: set[tuple[str, str | None]]) -> None:
        """Store the current state of each ``(bucket, key)``; ``key`` None: the bucket itself."""
        with self.lock:
            for bucket, key in sorted(names, key=lambda name: (name[0], name[1] is not None, name[1] or "")):
                if key is None:
                    folder = self.store.root / bucket
                    if bucket in self.backend.buckets:
                        folder.mkdir(exist_ok=True)
                    else:
                        shutil.rmtree(folder, ignore_errors=True)
                    continue
                found = self.backend.buckets.get(bucket)
                current = found.keys.get(key) if found is not None else None
                if current is None or not hasattr(current, "value"):  # deleted (or a delete marker)
                    self.store.remove(bucket, key)
                    continue
                header = {
                    "etag": current.etag.strip('"'),  # the property quotes it
                    "metadata": dict(current.metadata),
                    "last_modified": current.last_modified.isoformat(),
                }
                self.store.write(bucket, key, current.value, header)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") not in MUTATING_METHODS:
            return self.app(environ, start_response)
        self.touched.names = set()
        answer: list[Any] = []
        try:
            body = b"".join(self.app(environ, lambda *args: answer.append(args)))
            names = self.touched.names
        finally:
            self.touched.names = None
        status, headers = answer[-1][0], answer[-1][1]
        if names:
            try:
                self.flush(names)
            except OSError as error:  # the write was not made durable: the client must not think it was
                message = f"the S3 endpoint could not store the object on disk ({error})\n".encode()
                start_response("503 Service Unavailable",
                               [("Content-Type", "text/plain"), ("Content-Length", str(len(message)))])
                return [message]
        start_response(status, headers)
        return [body]


def register_key(keys_file: Path) -> None:
    """Create the pipeline's IAM user in moto's in-process backend with the key pair in ``keys_file``."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.iam.models import iam_backends

    keys = json.loads(keys_file.read_text())
    iam = iam_backends[DEFAULT_ACCOUNT_ID]["aws"]
    iam.create_user("us-east-1", USER)
    iam.put_user_policy(USER, "bucket", json.dumps(ALLOW_ALL))
    key = iam.create_access_key(USER)
    del iam.access_keys[key.access_key_id]
    key.access_key_id, key.secret_access_key = keys["aws_access_key_id"], keys["aws_secret_access_key"]
    iam.access_keys[key.access_key_id] = key


def main(argv: list[str] | None = None) -> None:
    """Serve moto's application, filtered and durable, on ``--host``:``--port`` (threaded, as moto.server
    does)."""
    parser = argparse.ArgumentParser(
        prog="python -m infra.cluster.s3_server", description=__doc__.split("\n")[0]
    )
    parser.add_argument("-H", "--host", default="127.0.0.1")
    parser.add_argument("-p", "--port", type=int, required=True)
    parser.add_argument("--keys-file", type=Path, required=True,
                        help="JSON file (mode 0600) with aws_access_key_id and aws_secret_access_key")
    parser.add_argument("--store", type=Path, required=True, help="folder that keeps the objects")
    args = parser.parse_args(argv)
    if not args.keys_file.is_file():
        parser.error(f"--keys-file {args.keys_file} does not exist: write the key pair there first (0600)")
    os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"  # read by moto.settings at import: sign every request
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from moto.s3.models import s3_backends
    from werkzeug.serving import run_simple

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    register_key(args.keys_file)
    durable = DurableBuckets(
        DomainDispatcherApplication(create_backend_app), ObjectStore(args.store),
        s3_backends[DEFAULT_ACCOUNT_ID]["aws"],
    )
    print(f"{durable.load()} objects loaded from {args.store}", flush=True)
    run_simple(args.host, args.port, WithoutAdminApi(durable), threaded=True,
               request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
