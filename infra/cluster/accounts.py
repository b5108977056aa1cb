"""Unprivileged accounts for the cluster's processes when ``up --hosts`` runs as root.

Only the ``ip`` commands that make and change the hosts need root. Every long-running process runs as a
system account of its role, so that a job (user code, by Ray's design) cannot read what another role holds:

    vae-ray     Ray's head and worker nodes and so every job: the Ray temp folders, the nodes' HOME, TMPDIR
                and data caches, the shared folder, the cluster token
    vae-mlflow  the MLflow server: its store folder, its auth config (the admin password), its TLS key
    vae-s3      the S3 endpoint: its objects and its key file
    postgres    PostgreSQL (Debian's account; postgres.py)

Root keeps ``credentials.json`` (every secret, 0600) and the state file; a process of one account cannot read
another's files (0700/0600) or its environment (``/proc/<pid>/environ`` is readable by its owner only).
Privileges are dropped with util-linux's ``setpriv`` (``--reuid/--regid/--init-groups``, ``--no-new-privs``):
it execs the command in place, so no root process stays behind as its parent (``runuser`` and ``su`` keep
one for the PAM session), and it runs after ``ip netns exec`` has entered the host's namespace.
The accounts are made with ``useradd --system`` (no home, no login shell) on the first ``up --hosts``.
Without ``--hosts``, or when not root, every process simply runs as the user who ran ``up``.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

from infra.cluster.layout import REPO_ROOT, ClusterError, ClusterLayout

RAY_ACCOUNT = "vae-ray"
MLFLOW_ACCOUNT = "vae-mlflow"
S3_ACCOUNT = "vae-s3"
# Every other process is a Ray node's; PostgreSQL's account is Debian's.
ROLE_ACCOUNTS = {"mlflow": MLFLOW_ACCOUNT, "s3": S3_ACCOUNT, "postgres": "postgres"}


@dataclasses.dataclass(frozen=True)
class Account:
    """A system account: its name, uid and primary gid."""

    name: str
    uid: int
    gid: int

    def run_as(self) -> list[str]:
        """The prefix that runs a command as this account: ``setpriv`` with its uid, gid and groups, no new
        privileges (a setuid binary cannot give any back)."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            "--no-new-privs",
            "--",
        ]

    def give(self, *paths: Path, recursive: bool = False) -> None:
        """Make ``paths`` (and, with ``recursive``, everything under them) this account's. Links are not
        followed: a link planted inside does not hand its target over."""
        for path in paths:
            os.chown(path, self.uid, self.gid, follow_symlinks=False)
            if recursive and path.is_dir() and not path.is_symlink():
                for root, folders, files in os.walk(path):
                    for name in folders + files:
                        os.chown(Path(root) / name, self.uid, self.gid, follow_symlinks=False)


def dropping(layout: ClusterLayout) -> bool:
    """Whether this cluster's processes run under the role accounts: ``--hosts`` started by root."""
    return bool(layout.settings.hosts) and os.geteuid() == 0


def account(name: str) -> Account:
    """The system account ``name``, made first (``useradd --system``, its own group, no home, no login
    shell) when this machine has none.

    Raises:
        ClusterError: it could not be made (useradd missing or failing; the message says what to do).
    """
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise ClusterError(
                f"the cluster's processes run as the system account {name!r}, which does not exist, and "
                "`useradd` (Debian's passwd package) is missing: install it or make the account yourself"
            ) from None
        nologin = shutil.which("nologin") or "/usr/sbin/nologin"
        done = subprocess.run(
            [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", nologin, "--comment", "VAE local cluster", name],
            capture_output=True,
            text=True,
        )
        try:
            entry = pwd.getpwnam(name)  # made now, or by another `up` at the same moment
        except KeyError:
            raise ClusterError(f"`useradd {name}` failed: {done.stderr.strip()}") from None
    return Account(name, entry.pw_uid, entry.pw_gid)


def for_process(layout: ClusterLayout, name: str) -> Account | None:
    """The account process ``name`` ("head", "worker-K", "mlflow", "s3") runs as, or None when this cluster
    does not drop privileges (:func:`dropping`)."""
    if not dropping(layout):
        return None
    return account(ROLE_ACCOUNTS.get(name, RAY_ACCOUNT))


def run_as(layout: ClusterLayout, name: str) -> list[str]:
    """The command prefix for process ``name``: its account's ``setpriv``, or nothing."""
    owner = for_process(layout, name)
    return owner.run_as() if owner else []


def check_reachable(layout: ClusterLayout) -> None:
    """Before anything starts: each account can enter the state folder and run this interpreter with the
    project (a 0700 folder above the repository, the venv or the state folder would stop every process at
    its first step, with the reason only in its log).

    Raises:
        ClusterError: an account cannot (the message names the account, the folder and the way out).
    """
    if not dropping(layout):
        return
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    # The interpreter runs itself again, as Ray does for every worker: a venv whose base interpreter lies
    # under a private folder (pyenv's under /root) may start once through a link and then fail there.
    probe = (
        "import os, subprocess, sys, infra.cluster; state = sys.argv[1]; "
        "subprocess.run([sys.executable, '-c', 'pass'], check=True); "
        "sys.exit(0 if os.access(state, os.X_OK) else f'cannot enter {state}')"
    )
    for name in (RAY_ACCOUNT, MLFLOW_ACCOUNT, S3_ACCOUNT):
        who = account(name)
        done = subprocess.run(
            [*who.run_as(), sys.executable, "-c", probe, str(layout.state_dir)],
            capture_output=True,
            text=True,
            cwd="/",
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise ClusterError(
                f"with --hosts the cluster's processes run as unprivileged accounts, and {name} cannot use "
                f"{sys.executable}, {REPO_ROOT} or the state folder {layout.state_dir}: {last}. Every folder "
                "above them and the venv's base interpreter must be enterable by others (chmod o+x): keep "
                "the state folder in the repository's tmp/ (the default), and make the venv from a system "
                "Python (`make clean-venv setup PYTHON=/usr/bin/python3`), not one under /root"
            )
