"""The S3 endpoint of the team deployment: moto's server (from PyPI), served by s3_server.py, which refuses
moto's unauthenticated admin API, signs every request with one key pair read from a 0600 file, and writes
each object through to the cluster's folder before it acknowledges the write. It stands in for AWS S3, GCS or
MinIO: any other key is refused (InvalidAccessKeyId / SignatureDoesNotMatch), and a killed endpoint started
again (``up`` on the running cluster) serves every acknowledged object with the same key, so running jobs go
on. The key pair is new on every ``up`` of a stopped cluster. What it does not protect (unlike a cloud
bucket): moto does not evaluate the Resource of IAM policies, so the key's policy is the intended one for a
real bucket rather than one this endpoint enforces (infra/README.md, threat model).
"""

from __future__ import annotations

import json
import secrets
import shutil
import string
import sys
from pathlib import Path

from infra.cluster import accounts, processes
from infra.cluster import credentials as secret_files
from infra.cluster.layout import BUCKET, LOOPBACK, REGION, REPO_ROOT, ClusterError, ClusterLayout
from infra.cluster.services import ServiceError, failed, retrying, start_service, wait_for_port

# The repository root for `-m`.
S3_ENV = {"PYTHONPATH": str(REPO_ROOT)}
KEY_NAMES = ("aws_access_key_id", "aws_secret_access_key")


def s3_command(python: str, port: int, keys_file: Path, store: Path, host: str = LOOPBACK) -> list[str]:
    """The command line of the S3 endpoint on ``host:port`` (s3_server.py): the key pair is read from
    ``keys_file``, never passed on the line; the objects are kept in ``store``. Run from the repository root
    (``cwd``) or with it on ``PYTHONPATH``."""
    return [python, "-m", "infra.cluster.s3_server", "-H", host, "-p", str(port), "--keys-file",
            str(keys_file), "--store", str(store)]


# The pipeline's key may use S3 on its bucket and nothing else (no IAM: it cannot make itself other keys).
BUCKET_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Action": "s3:*",
            "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
        }
    ],
}


def new_key_pair() -> dict[str, str]:
    """A fresh key pair in AWS's shape: a 20-character ``AKIA...`` id and a 40-character secret."""
    alphabet = string.ascii_uppercase + string.digits
    return {
        "aws_access_key_id": "AKIA" + "".join(secrets.choice(alphabet) for _ in range(16)),
        "aws_secret_access_key": secrets.token_urlsafe(30)[:40],
    }


def write_keys_file(path: Path, creds: dict[str, str]) -> Path:
    """Write the key pair alone (mode 0600) for the endpoint to read: it gets no other secret."""
    secret_files.write_private(path, json.dumps({name: creds[name] for name in KEY_NAMES}) + "\n")
    return path


def s3_client(endpoint: str, creds: dict[str, str]):
    """A boto3 S3 client with the pipeline's key pair, short timeouts and two attempts."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=creds["aws_access_key_id"],
        aws_secret_access_key=creds["aws_secret_access_key"],
        config=Config(retries={"max_attempts": 2}, connect_timeout=2, read_timeout=30),
    )


def wait_for_s3(endpoint: str, creds: dict[str, str], timeout_s: float) -> None:
    """Return once the endpoint answers a signed ListBuckets.

    Raises:
        ServiceError: it did not within ``timeout_s``.
    """
    try:
        retrying(timeout_s, 0.3, Exception)(lambda: s3_client(endpoint, creds).list_buckets())
    except Exception as error:  # noqa: BLE001 - any failure of the last try is the reason
        raise ServiceError(
            f"the S3 endpoint {endpoint} did not answer in {timeout_s:.0f}s ({error})"
        ) from None


def _pyarrow_s3(endpoint: str, creds: dict[str, str]):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(
        endpoint_override=endpoint.split("://", 1)[1],
        scheme="http",
        region=REGION,
        access_key=creds["aws_access_key_id"],
        secret_key=creds["aws_secret_access_key"],
    )


def restore_bucket(endpoint: str, creds: dict[str, str], saved: Path) -> int:
    """Upload a plain copy of the bucket (a folder of its keys) into it; returns the number of objects."""
    import pyarrow.fs as pafs

    if not saved.is_dir() or not any(saved.iterdir()):
        return 0
    pafs.copy_files(
        str(saved),
        BUCKET,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=_pyarrow_s3(endpoint, creds),
    )
    return sum(1 for p in saved.rglob("*") if p.is_file())


class S3Endpoint:
    """The cluster's S3 endpoint on the head host's address (port base+4)."""

    def __init__(self, layout: ClusterLayout) -> None:
        self.layout = layout

    def start(self, new_key: bool = False) -> int:
        """Start the endpoint with the cluster's key pair (a new one with ``new_key`` or when there is none),
        loading the objects it keeps in ``s3_store``; create the bucket if missing. A bucket saved by an
        older version of this endpoint (``saved_bucket``, a plain copy made at ``down``) is uploaded once and
        removed. Returns the number of objects the bucket holds.

        Raises:
            ClusterError: already running, or it did not start (with the tail of its log).
        """
        layout = self.layout
        if processes.find(layout.cluster_id, "s3"):
            raise ClusterError("the S3 endpoint is already running")
        creds = layout.credentials()
        if new_key or not all(name in creds for name in KEY_NAMES):
            creds = secret_files.update_credentials(layout.credentials_path, new_key_pair())
        keys_file = write_keys_file(layout.s3_keys_path, creds)
        host, port = layout.host_ip("s3"), layout.settings.s3_port
        command = [*accounts.run_as(layout, "s3"),
                   *s3_command(sys.executable, port, keys_file, layout.s3_store, host)]
        if owner := accounts.for_process(layout, "s3"):  # its key and its objects, nothing else
            layout.s3_store.mkdir(parents=True, exist_ok=True)
            owner.give(keys_file)
            owner.give(layout.s3_store, recursive=True)
        start_service(layout, "s3", command, layout.state_dir, S3_ENV)
        try:
            wait_for_port(port, layout.settings.start_timeout_s, host)
            wait_for_s3(str(layout.s3_url), creds, layout.settings.start_timeout_s)
            client = s3_client(str(layout.s3_url), creds)
            if BUCKET not in [b["Name"] for b in client.list_buckets()["Buckets"]]:
                client.create_bucket(Bucket=BUCKET)
            if layout.saved_bucket.is_dir():
                restore_bucket(str(layout.s3_url), creds, layout.saved_bucket)
                shutil.rmtree(layout.saved_bucket)
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            return sum(page.get("KeyCount", 0) for page in pages)
        except ServiceError as error:
            raise failed(layout, "s3", error) from None

    def healthy(self) -> bool:
        """Whether it answers a signed request within 2 s."""
        try:
            wait_for_s3(str(self.layout.s3_url), self.layout.credentials(), 2.0)
            return True
        except Exception:  # noqa: BLE001
            return False
