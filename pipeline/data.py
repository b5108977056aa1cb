"""Read the preprocessed arrays (the output of the ``preprocess`` stage) and cut them into batches.

numpy and the standard library only (no torch, ray, mlflow or dvc), so that it runs on the GPU machine as it is
and inside every Ray worker.

Layout read (see ``pipeline/preprocess.py``): ``data/processed/<dataset>/{split}_images.npy`` (uint8
(N, C, H, W)), ``{split}_attributes.npy`` (CelebA, uint8 (N, 40) in {0, 1}), ``{split}_identity.npy`` (CelebA,
int32 (N,)), ``{split}_labels.npy`` (MNIST family, uint8 (N,)), and ``manifest.json``.

Typical use::

    split = load_split(params.data.processed_path(), "train")        # memory-mapped, nothing read yet
    for batch in iterate_batches(split.images, 256, shuffle=True, seed=0, epoch=epoch,
                                 rank=rank, world_size=world_size, drop_last=True):
        x = torch.from_numpy(batch).to(device, non_blocking=True).float().div_(255)   # (B, C, H, W) in [0, 1]
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SPLITS = ("train", "valid", "test")
MANIFEST = "manifest.json"
_RUN_PREPROCESS = "run `dvc repro preprocess` (or `python -m pipeline.preprocess`) to create it"


@dataclass
class Split:
    """One split of a preprocessed dataset; all arrays are row-aligned.

    Attributes:
        images: uint8 (N, C, H, W) (memory-mapped read-only when loaded with ``mmap=True``).
        attributes: CelebA: uint8 (N, 40) in {0, 1}; None for the MNIST family.
        attribute_names: the 40 CelebA attribute names in column order; [] for the MNIST family.
        labels: MNIST family: uint8 (N,) class labels; None for CelebA.
        identity: CelebA: int32 (N,) person ids; None for the MNIST family.
        name: "train", "valid" or "test".
        dataset: "celeba", "mnist" or "fashion_mnist".
    """

    images: np.ndarray
    attributes: np.ndarray | None = None
    attribute_names: list[str] = field(default_factory=list)
    labels: np.ndarray | None = None
    identity: np.ndarray | None = None
    name: str = ""
    dataset: str = ""

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def attribute(self, name: str) -> np.ndarray:
        """The (N,) uint8 0/1 column of one CelebA attribute, e.g. ``split.attribute("Smiling")``.

        Raises:
            KeyError: not a CelebA split, or no such attribute (the message lists the valid names).
        """
        if self.attributes is None or name not in self.attribute_names:
            raise KeyError(f"no attribute {name!r} in the {self.dataset or 'this'} split; available: "
                           f"{', '.join(self.attribute_names) or 'none (not CelebA)'}")
        return self.attributes[:, self.attribute_names.index(name)]


def load_manifest(processed_dir: Path | str) -> dict[str, Any]:
    """The ``manifest.json`` written by the preprocess stage.

    Returns a dict with keys: dataset, image_shape [C, H, W], attribute_names, splits {split: {count, files:
    {file name: sha256}}}, sources, preprocess, skipped_files, format_version.

    Raises:
        FileNotFoundError: the folder or its manifest is missing (the message says which stage to run).
        ValueError: the manifest is not valid JSON.
    """
    processed_dir = Path(processed_dir)
    path = processed_dir / MANIFEST
    if not processed_dir.is_dir():
        raise FileNotFoundError(f"{processed_dir}: no preprocessed data here; {_RUN_PREPROCESS}")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (an incomplete or older preprocessing run); {_RUN_PREPROCESS}")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); {_RUN_PREPROCESS} again") from None


def load_split(processed_dir: Path | str, split: str, mmap: bool = True, verify: bool = False) -> Split:
    """Load one split of the preprocessed arrays.

    Args:
        processed_dir: ``data/processed/<dataset>`` (``Params.data.processed_path()``).
        split: "train", "valid" or "test".
        mmap: memory-map the arrays read-only (``np.load(mmap_mode="r")``: nothing is read until used, and the
            page cache is shared between processes); False reads them into memory.
        verify: check every file's sha256 against the manifest first (reads the whole split).
    Returns:
        A :class:`Split` whose arrays are row-aligned.
    Raises:
        FileNotFoundError: missing folder, manifest or array (the message says to run ``dvc repro preprocess``).
        ValueError: an unknown split name, or arrays that disagree with the manifest or each other (count, dtype,
            shape, sha256 when ``verify``).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    processed_dir = Path(processed_dir)
    manifest = load_manifest(processed_dir)
    entry = manifest.get("splits", {}).get(split)
    if entry is None:
        raise ValueError(f"{processed_dir / MANIFEST} has no split {split!r}; {_RUN_PREPROCESS} again")
    expected_files = entry.get("files", {})
    for name in expected_files:
        if not (processed_dir / name).is_file():
            raise FileNotFoundError(f"{processed_dir / name} is missing; {_RUN_PREPROCESS} again")
    if verify:
        for name, sha256 in expected_files.items():
            with open(processed_dir / name, "rb") as handle:
                actual = hashlib.file_digest(handle, "sha256").hexdigest()
            if actual != sha256:
                raise ValueError(f"{processed_dir / name}: sha256 differs from the manifest (modified or "
                                 f"corrupted); {_RUN_PREPROCESS} again")

    def read(name: str) -> np.ndarray | None:
        file_name = f"{split}_{name}.npy"
        if file_name not in expected_files:
            return None
        return np.load(processed_dir / file_name, mmap_mode="r" if mmap else None, allow_pickle=False)

    images = read("images")
    if images is None:
        raise FileNotFoundError(f"{processed_dir / f'{split}_images.npy'} is not in the manifest; "
                                f"{_RUN_PREPROCESS} again")
    count = entry.get("count")
    shape = tuple(manifest.get("image_shape", images.shape[1:]))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape or len(images) != count:
        raise ValueError(f"{processed_dir / f'{split}_images.npy'}: {images.dtype} {images.shape}, the manifest "
                         f"says uint8 ({count}, {', '.join(map(str, shape))}); {_RUN_PREPROCESS} again")
    result = Split(images, read("attributes"), list(manifest.get("attribute_names", [])), read("labels"),
                   read("identity"), split, manifest.get("dataset", ""))
    for name in ("attributes", "labels", "identity"):
        array = getattr(result, name)
        if array is not None and len(array) != len(images):
            raise ValueError(f"{processed_dir / f'{split}_{name}.npy'} has {len(array)} rows for {len(images)} "
                             f"images; {_RUN_PREPROCESS} again")
    return result


def _check_batching(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


def batch_indices(num_items: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1, drop_last: bool) -> Iterator[np.ndarray]:
    """Index batches of this rank's share of ``range(num_items)`` for one epoch (what
    :func:`iterate_batches` gathers; use it to pick row-aligned labels or attributes too).

    The order is a permutation drawn from ``(seed, epoch)`` (the same on every rank; a new one each epoch) or
    ``0..N-1`` without shuffling. Rank ``r`` takes positions ``r, r + world_size, ...`` of it (as PyTorch's
    ``DistributedSampler``), so the ranks' shares are disjoint and of equal length, and every rank yields the
    same number of batches (DDP ranks step together). When ``N`` is not a multiple of ``world_size``,
    ``drop_last=True`` drops the last ``N % world_size`` positions of the permutation (different images each
    epoch when shuffled) and ``drop_last=False`` pads with the first positions (a few images seen twice).
    ``drop_last`` also drops a final batch shorter than ``batch_size``. Indices within a batch are sorted
    (faster gathers from a memory map; the batch's content is unchanged).

    Yields:
        int64 arrays of at most ``batch_size`` indices.
    Raises:
        ValueError: batch_size < 1, world_size < 1, or rank outside [0, world_size).
    """
    _check_batching(batch_size, rank, world_size)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(num_items)
    else:
        order = np.arange(num_items)
    if num_items % world_size:
        if drop_last:
            order = order[: num_items - num_items % world_size]
        else:
            pad = world_size - num_items % world_size
            order = np.concatenate([order, np.resize(order, pad)]) if num_items else order
    share = order[rank::world_size]
    stop = len(share) - len(share) % batch_size if drop_last else len(share)
    for start in range(0, stop, batch_size):
        yield np.sort(share[start:start + batch_size])


def iterate_batches(images: np.ndarray, batch_size: int, *, shuffle: bool, seed: int, epoch: int, rank: int = 0,
                    world_size: int = 1, drop_last: bool) -> Iterator[np.ndarray]:
    """Batches of this rank's disjoint share of ``images`` for one epoch (see :func:`batch_indices` for the
    order, the partition across ranks and ``drop_last``).

    Args:
        images: uint8 (N, C, H, W), typically memory-mapped (``load_split(...).images``).
        batch_size: images per batch on this rank.
        shuffle, seed, epoch: a fresh seeded permutation per epoch, identical on all ranks.
        rank, world_size: this worker's index and the number of workers (DDP ranks).
        drop_last: drop the ragged end (see :func:`batch_indices`).
    Yields:
        uint8 arrays (B, C, H, W), B <= batch_size, each a new in-memory array (writable, so
        ``torch.from_numpy`` needs no copy).
    """
    _check_batching(batch_size, rank, world_size)
    if not shuffle and world_size == 1:  # contiguous slices: one sequential read per batch
        stop = len(images) - len(images) % batch_size if drop_last else len(images)
        for start in range(0, stop, batch_size):
            yield np.array(images[start:start + batch_size])
        return
    for indices in batch_indices(len(images), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                                 world_size=world_size, drop_last=drop_last):
        yield np.asarray(images[indices])
