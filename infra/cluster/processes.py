"""The cluster's processes: start one in a session of its own with its log, find exactly this cluster's
processes (by a marker in their environment, plus descendants), stop them with a grace period and SIGKILL.

Own code on psutil rather than a supervisor (supervisord, circus): ``ray start`` daemonizes - the raylet,
GCS, dashboard and agents it starts are not its children once it exits, so a supervisor that watches the
processes it started sees nothing to supervise; and the fault drills need to kill, cut and restart single
processes and whole nodes on purpose, which a restart policy would undo. The marker finds Ray's daemons
wherever they were reparented; psutil gives the process table portably.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from infra.cluster.layout import MARKER, NODE_MARKER, ClusterError


def console_script(name: str) -> str:
    """A console script of the running interpreter's environment (the venv's `ray`), else from PATH.

    Raises:
        ClusterError: found in neither.
    """
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise ClusterError(f"`{name}` not found next to {sys.executable} or on PATH; activate the venv")
    return found


def private_folder(path: Path, owner: Any = None) -> Path:
    """``path`` as a folder only this user (or ``owner``, an :class:`infra.cluster.accounts.Account` the
    cluster's processes run as) can use: made with mode 0700 when missing, then given to ``owner``; refused
    when it exists as a symlink, belongs to anyone else, or others may write to it (a folder under /tmp that
    another local user made first could read Ray's logs or plant files in the sockets' folder).

    Raises:
        ClusterError: it exists and is not ours (the message says what to remove or choose instead).
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        info = os.lstat(path)
        why = None
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            why = "it is not a plain folder (a symlink or a file)"
        elif info.st_uid not in (os.geteuid(), *([owner.uid] if owner else [])):
            why = f"it belongs to another user (uid {info.st_uid})"
        elif info.st_mode & 0o022:
            why = f"others may write to it (mode {stat.S_IMODE(info.st_mode):o})"
        if why:
            raise ClusterError(
                f"{path} exists and is not this cluster's: {why}. Remove it, or choose another "
                "folder (--ray-temp-root / VAE_CLUSTER_RAY_TMP, or another --base-port)"
            ) from None
    if owner is not None:
        owner.give(path)
    return path


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, or a note that there is none."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def spawn(cmd: list[str], env: dict[str, str], log: Path, cwd: Path, append: bool = True) -> subprocess.Popen:
    """Start ``cmd`` in a new session (Ctrl-C in the shell that ran `up` must not reach it; the daemons
    `ray start` leaves behind are not in our caller's process group), stdout and stderr to ``log``."""
    with open(log, "a" if append else "w") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=cwd,
        )


def find(cluster_id: str | None, node: str | None = None) -> list[Any]:
    """Live (non-zombie) processes of cluster ``cluster_id``, or of one of its nodes ("mlflow" is one too):
    those whose environment carries the marker, plus their descendants. This process and its parents are
    never listed."""
    import psutil

    if not cluster_id:
        return []
    key, wanted = (MARKER, cluster_id) if node is None else (NODE_MARKER, f"{cluster_id}/{node}")
    exclude = {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
    found: dict[int, Any] = {}
    for proc in psutil.process_iter():
        if proc.pid not in exclude and environ(proc).get(key) == wanted and alive(proc):
            found[proc.pid] = proc
    for proc in list(found.values()):  # a process that rewrote its environment block still counts
        with contextlib.suppress(psutil.Error):
            found.update(
                {
                    child.pid: child
                    for child in proc.children(recursive=True)
                    if child.pid not in exclude and alive(child)
                }
            )
    return list(found.values())


def describe(proc: Any) -> str:
    """``"<pid> <name>"`` (just the pid when it exited meanwhile)."""
    try:
        return f"{proc.pid} {proc.name()}"
    except Exception:  # noqa: BLE001 - it may have exited meanwhile
        return str(proc.pid)


def terminate(procs: list[Any], sig: int = signal.SIGTERM, grace_s: float = 5.0) -> list[Any]:
    """Send ``sig``; SIGKILL what is left after ``grace_s``. Returns the processes that survived both."""
    import psutil

    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)
    _, left = psutil.wait_procs(procs, timeout=grace_s)
    left = [p for p in left if alive(p)]
    for proc in left:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _, left = psutil.wait_procs(left, timeout=5.0)
    return [p for p in left if alive(p)]


def signal_all(procs: list[Any], sig: int) -> None:
    """Send ``sig`` to each process, ignoring those that exited meanwhile."""
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.send_signal(sig)


def name(proc: Any) -> str:
    """The process's name, or "?" when it exited meanwhile."""
    try:
        return proc.name()
    except Exception:  # noqa: BLE001
        return "?"


def environ(proc: Any) -> dict[str, str]:
    """A process's environment. On Linux read /proc directly: a process that set its title (Ray's agents and
    workers, ``ray::IDLE``) zeroes the start of its environment block, and psutil then returns nothing."""
    try:
        raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
    except FileNotFoundError:
        if Path("/proc/self/environ").exists():
            return {}  # the process is gone
        try:
            return dict(proc.environ())  # macOS and others
        except Exception:  # noqa: BLE001
            return {}
    except OSError:  # another user's process, or gone meanwhile
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode(errors="replace")] = value.decode(errors="replace")
    return env


def alive(proc: Any) -> bool:
    """Running and not a zombie."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
