"""The S3 endpoint of the team deployment: moto's server (from PyPI), served by s3_server.py, which refuses
moto's unauthenticated admin API. It stands in for AWS S3, GCS or MinIO, with request signing enforced
(``INITIAL_NO_AUTH_ACTION_COUNT``): the first calls create an IAM user with a generated key pair, and any
other key is refused (InvalidAccessKeyId / SignatureDoesNotMatch). It keeps objects in memory, so
:func:`save_bucket` copies the bucket into the cluster's folder before it stops and :func:`restore_bucket`
uploads them again on the next ``up``; the key pair is new on every start. What it does not protect (unlike
a cloud bucket): moto does not evaluate the Resource of IAM policies, so the key's policy is the intended one
for a real bucket rather than one this endpoint enforces (infra/README.md, threat model).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from infra.cluster import credentials as secret_files
from infra.cluster import processes
from infra.cluster.layout import BUCKET, LOOPBACK, REGION, REPO_ROOT, ClusterError, ClusterLayout
from infra.cluster.services import ServiceError, failed, retrying, start_service, wait_for_port

# The three IAM calls of provision_s3 unsigned, then signatures checked; the repository root for `-m`.
S3_ENV = {"INITIAL_NO_AUTH_ACTION_COUNT": "3", "PYTHONPATH": str(REPO_ROOT)}


def s3_command(python: str, port: int, host: str = LOOPBACK) -> list[str]:
    """The command line of moto's S3 server on ``host:port``, without its admin API (s3_server.py). Run from
    the repository root (``cwd``) or with it on ``PYTHONPATH``."""
    return [python, "-m", "infra.cluster.s3_server", "-H", host, "-p", str(port)]


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


def provision_s3(endpoint: str) -> dict[str, str]:
    """Create the pipeline's IAM user on a fresh endpoint (the only unsigned calls it accepts) and return its
    new key pair ``{"aws_access_key_id", "aws_secret_access_key"}``."""
    import boto3

    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="vae-pipeline")
    iam.put_user_policy(
        UserName="vae-pipeline",
        PolicyName="bucket",
        PolicyDocument=json.dumps(
            {
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
            }
        ),
    )
    key = iam.create_access_key(UserName="vae-pipeline")["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


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
    """Create the bucket and upload what :func:`save_bucket` kept; returns the number of objects."""
    import pyarrow.fs as pafs

    s3_client(endpoint, creds).create_bucket(Bucket=BUCKET)
    if not saved.is_dir() or not any(saved.iterdir()):
        return 0
    pafs.copy_files(
        str(saved),
        BUCKET,
        source_filesystem=pafs.LocalFileSystem(),
        destination_filesystem=_pyarrow_s3(endpoint, creds),
    )
    return sum(1 for p in saved.rglob("*") if p.is_file())


def save_bucket(endpoint: str, creds: dict[str, str], saved: Path) -> int:
    """Copy every object of the bucket into ``saved`` (replacing what was there); returns the count."""
    import pyarrow.fs as pafs

    fs = _pyarrow_s3(endpoint, creds)
    staging = saved.with_name(saved.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    infos = fs.get_file_info(pafs.FileSelector(BUCKET, recursive=True, allow_not_found=True))
    files = [i for i in infos if i.type == pafs.FileType.File]
    if files:
        pafs.copy_files(
            BUCKET, str(staging), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem()
        )
    shutil.rmtree(saved, ignore_errors=True)
    staging.replace(saved)
    return len(files)


class S3Endpoint:
    """The cluster's S3 endpoint on the head host's address (port base+4)."""

    def __init__(self, layout: ClusterLayout) -> None:
        self.layout = layout

    def start(self) -> int:
        """Start moto's server, create the IAM user (new key pair in the secrets file) and the bucket, and
        upload the objects `down` kept. Returns the number of objects restored.

        Raises:
            ClusterError: already running, or it did not start (with the tail of its log).
        """
        layout = self.layout
        if processes.find(layout.cluster_id, "s3"):
            raise ClusterError("the S3 endpoint is already running")
        host, port = layout.host_ip("s3"), layout.settings.s3_port
        start_service(layout, "s3", s3_command(sys.executable, port, host), layout.state_dir, S3_ENV)
        try:
            wait_for_port(port, layout.settings.start_timeout_s, host)
            creds = secret_files.update_credentials(layout.credentials_path, provision_s3(str(layout.s3_url)))
            return restore_bucket(str(layout.s3_url), creds, layout.saved_bucket)
        except ServiceError as error:
            raise failed(layout, "s3", error) from None

    def healthy(self) -> bool:
        """Whether it answers a signed request within 2 s."""
        try:
            wait_for_s3(str(self.layout.s3_url), self.layout.credentials(), 2.0)
            return True
        except Exception:  # noqa: BLE001
            return False

    def save(self) -> int:
        """Copy the bucket into the state folder (``saved_bucket``); returns the number of objects."""
        return save_bucket(str(self.layout.s3_url), self.layout.credentials(), self.layout.saved_bucket)
