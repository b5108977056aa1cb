"""Checkpoint files: one ``state.pt`` per checkpoint folder, written atomically and read without unpickling
code (``torch.load(weights_only=True)``), locally or on any ``pyarrow.fs`` filesystem (S3, GCS, ...)."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FILE = "state.pt"


def save_state(state: dict[str, Any], directory: Path) -> Path:
    """torch.save ``state`` into ``directory``/state.pt atomically (temporary file, then rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(directory: Path | str) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_state` (``weights_only=True``: no pickled code runs)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


def read_persisted_state(filesystem, folder: str) -> dict[str, Any]:
    """:func:`load_state` for a checkpoint folder on a ``pyarrow.fs`` filesystem (local, S3, ...), read straight
    into memory."""
    with filesystem.open_input_file(f"{folder}/{CHECKPOINT_FILE}") as handle:
        return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
