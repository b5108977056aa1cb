"""Checkpoints: one ``state.pt`` per folder, written atomically and read without unpickling code
(``torch.load(weights_only=True)``), locally or on any ``pyarrow.fs`` filesystem (S3, GCS, ...); and finding a
run's newest complete checkpoint on storage, whether or not Ray registered it."""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.common import atomic_output

CHECKPOINT_FILE = "state.pt"


def save_state(state: dict[str, Any], directory: Path) -> Path:
    """torch.save ``state`` into ``directory``/state.pt atomically (temporary file, then rename)."""
    with atomic_output(directory / CHECKPOINT_FILE) as tmp:
        torch.save(state, tmp)
    return directory / CHECKPOINT_FILE


def load_state(directory: Path | str) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_state` (``weights_only=True``: no pickled code runs)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def read_persisted_state(filesystem, folder: str) -> dict[str, Any]:
    """:func:`load_state` for a checkpoint folder on a ``pyarrow.fs`` filesystem (local, S3, ...), read
    straight
    into memory."""
    with filesystem.open_input_file(f"{folder}/{CHECKPOINT_FILE}") as handle:
        return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)


CHECKPOINT_DIR_PATTERN = re.compile(r"^checkpoint_epoch_(\d+)$")


def checkpoint_epoch(path: str | None) -> int:
    """The epoch in a ``checkpoint_epoch_NNNN`` folder name (0 for None or another name)."""
    found = CHECKPOINT_DIR_PATTERN.match(Path(path).name) if path else None
    return int(found.group(1)) if found else 0


def newest_persisted_checkpoint(
    filesystem, run_path: str, newer_than: int = 0
) -> tuple[str, dict[str, Any]] | None:
    """The newest complete checkpoint in a run's storage folder that is newer than epoch ``newer_than``.

    Why: Ray Train (V2) writes a checkpoint to storage inside ``ray.train.report`` but registers it only when
    the controller next polls the workers (every ~2 s). A worker, node or driver killed in between leaves a
    checkpoint on storage that ``ray.train.get_checkpoint()`` does not know, and the run would repeat that
    epoch or, killed early in epoch 2, restart from scratch. The folders are scanned newest first; one whose
    ``state.pt`` cannot be read (an upload cut short) or whose recorded epoch differs from its name is
    skipped.

    Args:
        filesystem: the ``pyarrow.fs.FileSystem`` of the run's storage (local, S3, GCS, ...).
        run_path: the run's folder on that filesystem (``<storage_path>/<run name>``).
        newer_than: only checkpoints of a later epoch count (the one Ray registered, or 0).

    Returns:
        ``(folder path, state dict)`` or None when no newer complete checkpoint exists.
    """
    import pyarrow.fs as pafs

    try:
        entries = filesystem.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    except OSError:
        return None
    folders = sorted(
        (
            (checkpoint_epoch(entry.path), entry.path)
            for entry in entries
            if entry.type == pafs.FileType.Directory and checkpoint_epoch(entry.path) > newer_than
        ),
        reverse=True,
    )
    for epoch, path in folders:
        try:
            state = read_persisted_state(filesystem, path)
        except Exception:  # noqa: BLE001 - an incomplete or unreadable checkpoint: try the previous one
            continue
        if int(state.get("epoch", -1)) == epoch:
            return path, state
    return None


def final_state(result) -> dict[str, Any] | None:
    """The state of a finished run: the newest complete checkpoint, whether or not Ray registered it (a
    restart after the last epoch's checkpoint was written but before it was registered trains nothing more and
    reports nothing; see :func:`newest_persisted_checkpoint`). Unregistered checkpoints older than the newest
    registered one are removed, so ``train.checkpoint_num_to_keep`` still bounds the folder."""
    registered = {checkpoint_epoch(c.path): c.path for c, _ in (result.best_checkpoints or [])}
    newest = max(registered, default=0)
    if result.checkpoint is not None:
        newest = max(newest, checkpoint_epoch(result.checkpoint.path))
    newer = newest_persisted_checkpoint(result.filesystem, result.path, newest)
    if newer is not None:
        print(
            f"[train] final state from {newer[0]} (written, not yet registered by Ray when the run ended)",
            flush=True,
        )
        return newer[1]
    keep = set(registered.values()) | ({result.checkpoint.path} if result.checkpoint is not None else set())
    _remove_orphan_checkpoints(result.filesystem, result.path, keep, newest)
    if result.checkpoint is None:
        return None
    return read_persisted_state(result.filesystem, result.checkpoint.path)


def _remove_orphan_checkpoints(filesystem, run_path: str, keep: set[str], older_than: int) -> None:
    import pyarrow.fs as pafs

    try:
        entries = filesystem.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
        for entry in entries:
            epoch = checkpoint_epoch(entry.path)
            if entry.type == pafs.FileType.Directory and 0 < epoch < older_than and entry.path not in keep:
                filesystem.delete_dir(entry.path)
    except OSError as error:  # tidying only; the outputs do not depend on it
        print(
            f"[train] could not remove an unregistered old checkpoint in {run_path}: {error}", file=sys.stderr
        )
