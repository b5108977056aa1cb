"""What every benchmark records with its figures: the machine, the commit, and the RESULTS.md section the
block
is appended to (newest last)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

from pipeline.tracking import git_commit, git_dirty

RESULTS_PATH = Path(__file__).resolve().parent / "RESULTS.md"


def commit() -> str:
    """The short commit, marked when tracked files have uncommitted changes."""
    sha = git_commit()
    return sha[:7] + (" (with uncommitted changes)" if git_dirty() else "") if sha != "unknown" else sha


def cpu_model() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    return model


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def append_to_section(section: str, intro: str, block: str, path: Path = RESULTS_PATH) -> None:
    """Add ``block`` at the end of ``section`` ("## Title") of RESULTS.md; the section (with ``intro``) and
    the file are created when missing."""
    text = (
        path.read_text()
        if path.is_file()
        else (
            "# Benchmark results\n\nFigures appended by the scripts in "
            "benchmarks/, newest last in each section.\n"
        )
    )
    if section not in text:
        text = text.rstrip() + f"\n\n{section}\n\n{intro}\n"
    start = text.index(section) + len(section)
    following = text.find("\n## ", start)
    end = len(text) if following < 0 else following
    tail = "\n" + text[end:].lstrip("\n") if following >= 0 else ""
    path.write_text(text[:end].rstrip() + "\n\n" + block.strip() + "\n" + tail)
