"""Paths, atomic writes and the stage error: standard library only, so the per-worker training loop,
tracking and evaluation code import on a machine that has torch and numpy but not pydantic or PyYAML."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = Path("models/vae")  # the train stage's model output (weights + config), relative to the project root


class StageError(RuntimeError):
    """An expected failure of a stage; its ``main`` prints it without a traceback and exits 1. Every stage's
    error type derives from it (``ConfigError``, ``DataStageError``, ``SubmitError``)."""


def project_root() -> Path:
    """Where relative paths (data/, models/, reports/, runs/, mlflow.db) live: ``VAE_PROJECT_ROOT`` if set
    (tests and scratch runs use it to keep a workspace apart), else the repository root."""
    return Path(os.environ.get("VAE_PROJECT_ROOT") or REPO_ROOT).resolve()


def resolve(path: Path | str) -> Path:
    """An absolute path: relative paths are taken from :func:`project_root` (Ray changes working directories)."""
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else (project_root() / path)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` (relative: under the project root) through a temporary file in the same
    folder and a rename, so a reader sees the old file or the new one, never half of one."""
    path = resolve(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        handle.write(text)
        tmp = Path(handle.name)
    os.replace(tmp, path)


def stage_argument_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The command line every stage shares: ``python -m <module> [--params PATH]`` (the first paragraph of the
    module docstring as the description)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}", description=(doc or "").split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=None,
                        help="params.yaml to read (default: $VAE_PARAMS or the repository's params.yaml)")
    return parser


def run_stage(name: str, body: Callable[[], int | None], interrupted: str | None = None) -> int:
    """Run a stage's ``main`` body and turn its expected failures into an exit status.

    An expected failure (a :class:`StageError` of any kind - bad params, a data, cluster or submission error - or
    a missing file) prints "<name> failed: <message>" on stderr, without a traceback, and returns 1. Ctrl-C
    returns 130 after printing ``interrupted`` (what was kept), when given. Anything else is a bug and
    propagates with its traceback.

    Returns:
        The body's exit status (None counts as 0), 1 or 130.
    """
    try:
        return body() or 0
    except (StageError, FileNotFoundError) as error:
        print(f"\n{name} failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"\n{name} interrupted: {interrupted}", file=sys.stderr)
        return 130
