"""What every stage shares: project paths, atomic outputs, the stage error and the stage command line."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class StageError(RuntimeError):
    """An expected failure of a stage; its ``main`` prints it without a traceback and exits 1. Every stage's
    error type derives from it (``ConfigError``, ``DataStageError``, ``SubmitError``)."""


def project_root() -> Path:
    """Where relative paths (data/, models/, reports/, runs/, mlflow.db) live: ``VAE_PROJECT_ROOT`` if set
    (tests and scratch runs use it to keep a workspace apart), else the repository root."""
    return Path(os.environ.get("VAE_PROJECT_ROOT") or REPO_ROOT).resolve()


def resolve(path: Path | str) -> Path:
    """An absolute path: relative paths are taken from :func:`project_root` (Ray changes working
    directories)."""
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else (project_root() / path)


def make_readable(path: Path) -> None:
    """Give a file made by ``tempfile`` (mode 0600) or a folder made by ``mkdtemp`` (0700) the modes of a
    normal file or folder (0644 / 0755 under the usual umask), before it is renamed into place."""
    mask = os.umask(0o022)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Write a file atomically: yields a temporary path in the same folder (the same filesystem) to write to;
    when the block ends without an error it is renamed onto ``path``, so a reader sees the old file or the new
    one, never half of one; on an error it is removed and ``path`` is untouched.

    Example::

        with atomic_output(folder / "model.safetensors") as tmp:
            save_file(weights, str(tmp))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        make_readable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` (relative: under the project root) atomically (:func:`atomic_output`)."""
    with atomic_output(resolve(path)) as tmp:
        tmp.write_text(text)


def say(message: str) -> None:
    """One progress line on stdout. (Ray Train patches ``print`` into its logger and also tees it, which
    doubles every line; writing to the stream directly gives each line once.)"""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def format_seconds(seconds: float) -> str:
    """A duration for a progress line: ``4m05s``, or ``2h07m`` from an hour on."""
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
