"""The team deployment's private PostgreSQL (MLflow's tracking store and its accounts): Debian's server
binaries (``/usr/lib/postgresql/<version>/bin``), a data directory initialised in the cluster's folder with
a generated password (scram-sha-256), listening on the head host's address only, no Unix socket; never the
system-wide service. PostgreSQL refuses to run as root: as root it runs as the ``postgres`` user.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

from infra.cluster import accounts, processes
from infra.cluster import credentials as secret_files
from infra.cluster.layout import HEAD, LOOPBACK, ClusterError, ClusterLayout
from infra.cluster.services import ServiceError, failed, retrying, start_service

PG_USER = "mlflow"
TRACKING_DB = "mlflow"
AUTH_DB = "mlflow_auth"
# As root, where a data folder goes when the postgres user cannot reach the state folder.
DATA_PARENT = Path("/var/tmp")
DATA_PREFIX = "vae-postgres-"


def postgres_bin(name: str) -> str:
    """A PostgreSQL server binary (Debian's versioned folder, newest first, then PATH).

    Raises:
        ServiceError: not installed (the message says how to install it).
    """
    for folder in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]), reverse=True
    ):
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
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise ServiceError(
            "running as root, PostgreSQL needs the `postgres` user (Debian's postgresql package creates it)"
        ) from None
    # setpriv execs in place (runuser would stay behind as a root parent for its PAM session).
    return accounts.Account("postgres", entry.pw_uid, entry.pw_gid).run_as()


def postgres_data_dir(wanted: Path) -> Path:
    """``wanted``, or - as root, when the ``postgres`` user cannot reach it (a 0700 folder above it) - a new
    folder under /var/tmp with an unpredictable name (made by :func:`tempfile.mkdtemp`, mode 0700, then given
    to ``postgres``) that ``wanted`` links to. A folder someone else prepared is never adopted: an existing
    link must lead to a 0700 folder of ``postgres`` made this way.

    Raises:
        ServiceError: ``wanted`` is a link to a folder that is not such a folder.
    """
    if os.geteuid() != 0:
        return wanted
    probe = subprocess.run([*run_as(), "test", "-x", str(wanted.parent)], capture_output=True)
    if probe.returncode == 0:
        return wanted
    if wanted.is_symlink():
        target = wanted.resolve()
        info = os.lstat(target) if target.exists() else None
        ours = (
            info is not None
            and stat.S_ISDIR(info.st_mode)
            and stat.S_IMODE(info.st_mode) == 0o700
            and info.st_uid == pwd.getpwnam("postgres").pw_uid
            and target.parent == DATA_PARENT
            and target.name.startswith(DATA_PREFIX)
        )
        if not ours:
            raise ServiceError(
                f"{wanted} links to {target}, which is not a private PostgreSQL folder made by "
                f"this cluster; remove the link (and {target} if it is yours) and start again"
            )
        return target
    elsewhere = Path(tempfile.mkdtemp(prefix=DATA_PREFIX, dir=DATA_PARENT))
    shutil.chown(elsewhere, "postgres", "postgres")
    wanted.parent.mkdir(parents=True, exist_ok=True)
    wanted.symlink_to(elsewhere)
    return elsewhere


def init_postgres(data_dir: Path, password: str, log: Path) -> bool:
    """``initdb`` the data directory once (user ``mlflow``, scram-sha-256). Returns True if it was created.

    Raises:
        ServiceError: initdb failed (with its error output).
    """
    if (data_dir / "PG_VERSION").is_file():
        return False
    data_dir.mkdir(parents=True, exist_ok=True)
    pwfile = data_dir.parent / f".{data_dir.name}.pw"
    secret_files.write_private(pwfile, password + "\n")
    if os.geteuid() == 0:
        shutil.chown(data_dir, "postgres", "postgres")
        os.chmod(data_dir, 0o700)
        shutil.chown(pwfile, "postgres", "postgres")
    try:
        done = subprocess.run(
            [
                *run_as(),
                postgres_bin("initdb"),
                "-D",
                str(data_dir),
                "-U",
                PG_USER,
                f"--pwfile={pwfile}",
                "-A",
                "scram-sha-256",
                "-E",
                "UTF8",
                "--no-instructions",
            ],
            capture_output=True,
            text=True,
            timeout=120,
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
    """The server's command line: ``host:port`` only, no Unix socket, a small footprint."""
    return [
        *run_as(),
        postgres_bin("postgres"),
        "-D",
        str(data_dir),
        "-p",
        str(port),
        "-c",
        f"listen_addresses={host}",
        "-c",
        "unix_socket_directories=",
        "-c",
        "max_connections=60",
        "-c",
        "shared_buffers=32MB",
    ]


def postgres_url(port: int, password: str, database: str, host: str = LOOPBACK) -> str:
    """``postgresql://mlflow:<password>@host:port/database`` (the password URL-quoted)."""
    return f"postgresql://{PG_USER}:{quote(password, safe='')}@{host}:{port}/{database}"


def wait_for_postgres(port: int, password: str, timeout_s: float, host: str = LOOPBACK) -> None:
    """Wait until PostgreSQL accepts a login, then create the tracking and auth databases if missing.

    Raises:
        ServiceError: no login within ``timeout_s``.
    """
    import psycopg

    def login_and_create() -> None:
        with psycopg.connect(
            postgres_url(port, password, "postgres", host), autocommit=True, connect_timeout=2
        ) as conn:
            existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
            for name in (TRACKING_DB, AUTH_DB):
                if name not in existing:
                    conn.execute(f'CREATE DATABASE "{name}"')

    try:
        retrying(timeout_s, 0.3, psycopg.OperationalError)(login_and_create)
    except psycopg.OperationalError as error:
        raise ServiceError(
            f"PostgreSQL on {host}:{port} did not accept a login in {timeout_s:.0f}s ({error})"
        ) from None


class Postgres:
    """The cluster's PostgreSQL on the head host's address (port base+5), data in ``postgres_dir``."""

    def __init__(self, layout: ClusterLayout) -> None:
        self.layout = layout

    def start(self) -> bool:
        """Start the server (``initdb`` on first use) and create the databases; returns whether the data
        directory was created now.

        Raises:
            ClusterError: already running, or it did not start (with the tail of its log).
        """
        layout = self.layout
        if processes.find(layout.cluster_id, "postgres"):
            raise ClusterError("PostgreSQL is already running")
        creds, host, port = layout.credentials(), layout.host_ip("postgres"), layout.settings.postgres_port
        try:
            data_dir = postgres_data_dir(layout.postgres_dir)
            created = init_postgres(data_dir, creds["postgres_password"], layout.logs_dir / "initdb.log")
            if layout.network:  # MLflow's server connects from its own host, `up` from the head's address
                for client in (HEAD, "mlflow"):
                    allow_postgres_client(data_dir, layout.host_ip(client))
            start_service(layout, "postgres", postgres_command(data_dir, port, host), layout.state_dir)
            wait_for_postgres(port, creds["postgres_password"], layout.settings.start_timeout_s, host)
        except ServiceError as error:
            raise failed(layout, "postgres", error) from None
        return created

    def stop(self) -> list:
        """PostgreSQL's fast shutdown (SIGINT; SIGTERM would wait for its clients), SIGKILL after 15 s.
        Returns the processes that survived."""
        return processes.terminate(
            processes.find(self.layout.cluster_id, "postgres"), sig=signal.SIGINT, grace_s=15.0
        )

    def wipe(self) -> None:
        """Remove the data directory (and the folder under /var/tmp it links to, as root)."""
        folder = self.layout.postgres_dir
        if folder.is_symlink():
            shutil.rmtree(folder.resolve(), ignore_errors=True)
            folder.unlink()
        shutil.rmtree(folder, ignore_errors=True)
