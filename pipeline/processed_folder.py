"""The preprocessed dataset folder as the preprocess stage writes it: built in a partial folder beside its
place and renamed into place only when complete (a failed or interrupted run leaves the previous folder as it
was, and a reader never finds half a dataset), and its ``manifest.json``: the format version, image shape,
attribute names, every split's count and every array's sha256 (what readers and the node-local cache verify
against), and every input file's md5, size and recorded source (the download stage's ``sources.json``).
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import datasets as ds
from pipeline.common import atomic_output, make_readable

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def file_hexdigest(path: Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file (``hashlib.file_digest``: read in blocks, never whole into memory)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, algorithm).hexdigest()


class _OutputFolder:
    """A temporary folder beside ``out_dir`` that replaces it atomically on :meth:`publish` and is removed
    otherwise (failure, interruption)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.path = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))

    def save(self, name: str, array: np.ndarray) -> None:
        """np.save into the folder through a temporary file and a rename."""
        with atomic_output(self.path / name) as tmp, open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)

    def publish(self) -> None:
        make_readable(self.path)
        if self.out_dir.exists():
            old = Path(tempfile.mkdtemp(dir=self.out_dir.parent, prefix=f".{self.out_dir.name}.partial-old-"))
            os.replace(self.out_dir, old / "previous")
            os.replace(self.path, self.out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.path, self.out_dir)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _manifest(
    folder: Path,
    dataset: str,
    image_shape: tuple[int, ...],
    attribute_names: list[str],
    counts: dict[str, int],
    sources: dict[str, Any],
    preprocess: dict[str, Any],
    skipped: list[str],
) -> dict[str, Any]:
    splits = {}
    for split in ds.SPLITS:
        files = sorted(p.name for p in folder.glob(f"{split}_*.npy"))
        splits[split] = {
            "count": counts[split],
            "files": {name: file_hexdigest(folder / name) for name in files},
        }
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "image_shape": list(image_shape),
        "attribute_names": list(attribute_names),
        "splits": splits,
        "sources": sources,
        "preprocess": preprocess,
        "skipped_files": skipped,
    }


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _input_checksums(paths: list[Path], record_path: Path) -> dict[str, Any]:
    """md5 and size of every input file, with the download stage's record of where it came from."""
    record = {}
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text()).get("files", {})
        except ValueError:
            record = {}
    sources = {}
    for path in paths:
        entry: dict[str, Any] = {"md5": file_hexdigest(path, "md5"), "size": path.stat().st_size}
        known = record.get(path.name)
        if isinstance(known, dict) and known.get("md5") == entry["md5"]:
            entry.update(source=known.get("source"), verified_by=known.get("verified_by"))
        sources[path.name] = entry
    return sources


def map_in_processes(function: Callable[[Any], Any], tasks: list[Any], workers: int) -> Iterator[Any]:
    """``map(function, tasks)`` in order, on ``workers`` processes when more than one (and more than one
    task).

    The pool's processes are spawned, not forked: the parent may run threads (progress bars, Ray, a test
    server), and fork()ing a multi-threaded process can deadlock; and each spawned process starts with the
    parent's environment as it is now (a forkserver started earlier would hand out the environment of its own
    start, without credentials set since). A script calling this must guard its top level with
    ``if __name__ == "__main__":`` (the workers import the main module). The pool is terminated when the
    iterator is closed or garbage collected.
    """
    if workers <= 1 or len(tasks) <= 1:
        yield from map(function, tasks)
        return
    pool = multiprocessing.get_context("spawn").Pool(min(workers, len(tasks)))
    try:
        yield from pool.imap(function, tasks)
    finally:
        pool.terminate()
        pool.join()


def worker_count(num_workers: int) -> int:
    """``num_workers``, or with 0 the cores this process may run on."""
    if num_workers > 0:
        return num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
