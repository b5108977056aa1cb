"""The services of the team deployment on one machine (``infra/local-cluster.sh up --team``): an S3-compatible
endpoint, a private PostgreSQL instance, and the settings of an MLflow server with basic-auth on top of them.

- S3: moto's standalone server (``moto_server``, from PyPI) on 127.0.0.1 stands in for AWS S3, GCS or MinIO,
  with request signing enforced (``INITIAL_NO_AUTH_ACTION_COUNT``): the first calls create an IAM user with
  a generated key pair, and any other key is refused (InvalidAccessKeyId / SignatureDoesNotMatch). It keeps
  objects in memory, so :func:`save_bucket` copies the bucket into the cluster's folder before it stops and
  :func:`restore_bucket` uploads them again on the next ``up``; the key pair is new on every start.
- PostgreSQL: Debian's server binaries (``/usr/lib/postgresql/<version>/bin``), a data directory initialised
  in the cluster's folder with a generated password (scram-sha-256), listening on 127.0.0.1 only, no Unix
  socket; never the system-wide service. PostgreSQL refuses to run as root: as root it runs as the
  ``postgres`` user.
- MLflow's basic-auth app reads its admin account and user database from an ini file
  (``MLFLOW_AUTH_CONFIG_PATH``), written with mode 0600.
"""

from __future__ import annotations

import configparser
import glob
import os
import pwd
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

BUCKET = "vae"
REGION = "us-east-1"
PG_USER = "mlflow"
TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"
ADMIN_USER = "admin"


class ServiceError(RuntimeError):
    """A service did not start or stop; the message says what to fix."""


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600 from the first byte (secrets: passwords, keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
        handle.write(text)
    tmp.replace(path)


def credentials(path: Path) -> dict[str, str]:
    """The deployment's generated secrets (PostgreSQL and MLflow admin passwords, the Flask secret), created
    once and kept (mode 0600) so the kept data stay usable after ``down`` and ``up``; plus the S3 key pair of
    the current start (:func:`update_credentials`)."""
    import json

    if path.is_file():
        return json.loads(path.read_text())
    values = {
        "postgres_password": secrets.token_urlsafe(18),
        "mlflow_admin_password": secrets.token_urlsafe(18),
        "flask_secret_key": secrets.token_hex(24),
    }
    write_private(path, json.dumps(values, indent=2) + "\n")
    return values


# ------------------------------------------------------------------------------------------------ S3
LOOPBACK = "127.0.0.1"  # where the services listen, unless the cluster's hosts have their own addresses
S3_ENV = {"INITIAL_NO_AUTH_ACTION_COUNT": "3"}  # the three IAM calls of provision_s3, then signatures checked


def s3_command(python: str, port: int, host: str = LOOPBACK) -> list[str]:
    return [python, "-m", "moto.server", "-H", host, "-p", str(port)]


def wait_for_port(port: int, timeout_s: float, host: str = LOOPBACK) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise ServiceError(f"nothing listens on {host}:{port} after {timeout_s:.0f}s")


def provision_s3(endpoint: str) -> dict[str, str]:
    """Create the pipeline's IAM user on a fresh endpoint (the only unsigned calls it accepts) and return its
    new key pair ``{"aws_access_key_id", "aws_secret_access_key"}``."""
    import json

    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION, aws_access_key_id="bootstrap",
                       aws_secret_access_key="bootstrap")
    iam.create_user(UserName="vae-pipeline")
    iam.put_user_policy(UserName="vae-pipeline", PolicyName="bucket", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}],
    }))
    key = iam.create_access_key(UserName="vae-pipeline")["AccessKey"]
    return {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}


def update_credentials(path: Path, values: dict[str, str]) -> dict[str, str]:
    import json

    merged = {**credentials(path), **values}
    write_private(path, json.dumps(merged, indent=2) + "\n")
    return merged


def s3_client(endpoint: str, creds: dict[str, str]):
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
    deadline, error = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            s3_client(endpoint, creds).list_buckets()
            return
        except Exception as exc:  # noqa: BLE001 - still starting
            error = exc
            time.sleep(0.3)
    raise ServiceError(f"the S3 endpoint {endpoint} did not answer in {timeout_s:.0f}s ({error})")


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
    pafs.copy_files(str(saved), BUCKET, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=_pyarrow_s3(endpoint, creds))
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
        pafs.copy_files(BUCKET, str(staging), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    shutil.rmtree(saved, ignore_errors=True)
    staging.replace(saved)
    return len(files)


# ------------------------------------------------------------------------------------------ PostgreSQL
def postgres_bin(name: str) -> str:
    """A PostgreSQL server binary (Debian's versioned folder, newest first, then PATH)."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]),
                         reverse=True):
        if Path(folder, name).exists():
            return str(Path(folder, name))
    found = shutil.which(name)
    if not found:
        raise ServiceError(
            f"PostgreSQL's `{name}` is not installed: `apt-get install postgresql` (Debian/Ubuntu; the "
            "server binaries land in /usr/lib/postgresql/<version>/bin), or use --no-team"
        )
    return found


def run_as() -> list[str]:
    """The prefix that runs a PostgreSQL binary: as root, as the ``postgres`` user (it refuses root)."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError("running as root, PostgreSQL needs the `postgres` user (Debian's postgresql "
                           "package creates it)") from None
    return ["runuser", "-u", "postgres", "--"]


def postgres_data_dir(wanted: Path) -> Path:
    """``wanted``, or - as root, when the ``postgres`` user cannot reach it (a 0700 folder above it) - a
    folder under /var/tmp that ``wanted`` then links to."""
    if os.geteuid() != 0:
        return wanted
    probe = subprocess.run([*run_as(), "test", "-x", str(wanted.parent)], capture_output=True)
    if probe.returncode == 0:
        return wanted
    if wanted.is_symlink():
        return wanted.resolve()
    import hashlib

    elsewhere = Path("/var/tmp") / f"vae-postgres-{hashlib.sha256(str(wanted).encode()).hexdigest()[:12]}"
    elsewhere.mkdir(parents=True, exist_ok=True)
    os.chmod(elsewhere, 0o700)
    shutil.chown(elsewhere, "postgres", "postgres")
    wanted.parent.mkdir(parents=True, exist_ok=True)
    wanted.symlink_to(elsewhere)
    return elsewhere


def init_postgres(data_dir: Path, password: str, log: Path) -> bool:
    """``initdb`` the data directory once (user ``mlflow``, scram-sha-256). Returns True if it was created."""
    if (data_dir / "PG_VERSION").is_file():
        return False
    data_dir.mkdir(parents=True, exist_ok=True)
    pwfile = data_dir.parent / f".{data_dir.name}.pw"
    write_private(pwfile, password + "\n")
    if os.geteuid() == 0:
        shutil.chown(data_dir, "postgres", "postgres")
        os.chmod(data_dir, 0o700)
        shutil.chown(pwfile, "postgres", "postgres")
    try:
        done = subprocess.run(
            [*run_as(), postgres_bin("initdb"), "-D", str(data_dir), "-U", PG_USER, f"--pwfile={pwfile}",
             "-A", "scram-sha-256", "-E", "UTF8", "--no-instructions"],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise ServiceError(f"initdb failed (exit {done.returncode}); {log}:\n{done.stderr[-2000:]}")
    return True


def allow_postgres_client(data_dir: Path, address: str) -> None:
    """Let ``address`` (the MLflow host of ``local-cluster up --hosts``) log in with a password: initdb's
    pg_hba.conf admits loopback only. Idempotent; takes effect at the next start."""
    hba = data_dir / "pg_hba.conf"
    line = f"host all all {address}/32 scram-sha-256"
    if line not in hba.read_text().splitlines():
        with open(hba, "a") as handle:
            handle.write(line + "\n")


def postgres_command(data_dir: Path, port: int, host: str = LOOPBACK) -> list[str]:
    return [*run_as(), postgres_bin("postgres"), "-D", str(data_dir), "-p", str(port),
            "-c", f"listen_addresses={host}", "-c", "unix_socket_directories=",
            "-c", "max_connections=60", "-c", "shared_buffers=32MB"]


def postgres_url(port: int, password: str, database: str, host: str = LOOPBACK) -> str:
    from urllib.parse import quote

    return f"postgresql://{PG_USER}:{quote(password, safe='')}@{host}:{port}/{database}"


def wait_for_postgres(port: int, password: str, timeout_s: float, host: str = LOOPBACK) -> None:
    """Wait until PostgreSQL accepts a login, then create the tracking and auth databases if missing."""
    import psycopg

    deadline, error = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(postgres_url(port, password, "postgres", host), autocommit=True,
                                 connect_timeout=2) as conn:
                existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
                for name in (TRACKING_DB, AUTH_DB):
                    if name not in existing:
                        conn.execute(f'CREATE DATABASE "{name}"')
            return
        except psycopg.OperationalError as exc:
            error = exc
            time.sleep(0.3)
    raise ServiceError(f"PostgreSQL on {host}:{port} did not accept a login in {timeout_s:.0f}s ({error})")


# ------------------------------------------------------------------------------------------- MLflow
def write_auth_config(path: Path, pg_port: int, creds: dict[str, str], pg_host: str = LOOPBACK) -> None:
    """The basic-auth app's ini (``MLFLOW_AUTH_CONFIG_PATH``): users in PostgreSQL, the generated admin
    password, READ for new users by default. Mode 0600: it holds two passwords."""
    config = configparser.ConfigParser(interpolation=None)
    config["mlflow"] = {
        "default_permission": "READ",
        "database_uri": postgres_url(pg_port, creds["postgres_password"], AUTH_DB, pg_host),
        "admin_username": ADMIN_USER,
        "admin_password": creds["mlflow_admin_password"],
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    import io

    buffer = io.StringIO()
    config.write(buffer)
    write_private(path, buffer.getvalue())


def mlflow_team_args(pg_port: int, creds: dict[str, str], pg_host: str = LOOPBACK) -> list[str]:
    """``mlflow server`` arguments of the team deployment: PostgreSQL store, artifacts proxied to the bucket
    (clients need no S3 credentials), the basic-auth app."""
    return ["--app-name", "basic-auth",
            "--backend-store-uri", postgres_url(pg_port, creds["postgres_password"], TRACKING_DB, pg_host),
            "--artifacts-destination", f"s3://{BUCKET}/mlflow"]


def redact(command: list[str], creds: dict[str, Any]) -> list[str]:
    """``command`` with every generated secret replaced by ***, for logs and the state file."""
    from urllib.parse import quote

    secrets_ = [str(v) for v in creds.values()] + [quote(str(v), safe="") for v in creds.values()]
    out = []
    for part in command:
        for secret in secrets_:
            part = part.replace(secret, "***")
        out.append(part)
    return out
