"""Read the preprocessed arrays (the output of the ``preprocess`` stage), share them among data-parallel ranks
and cut them into batches: the one data path of training and evaluation.

Layout read (see ``pipeline/preprocess.py``): ``data/processed/<dataset>/{split}_images.npy`` (uint8
(N, C, H, W)), ``{split}_attributes.npy`` (CelebA, uint8 (N, 40) in {0, 1}), ``{split}_identity.npy`` (CelebA,
int32 (N,)), ``{split}_labels.npy`` (MNIST family, uint8 (N,)), and ``manifest.json``.

Typical use (what the training loop does)::

    source = BatchSource(load_images(processed_dir, "train"), device, on_device=False)
    indices = training_indices(len(source.host), local_batch_size, epoch, seed, rank, world_size)
    for x in source.batches(indices, local_batch_size):   # uint8 (B, C, H, W) on the device
        ...
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import storage, storage_access

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
        raise FileNotFoundError(
            f"{path} is missing (an incomplete or older preprocessing run); {_RUN_PREPROCESS}"
        )
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
        FileNotFoundError: missing folder, manifest or array (the message says to run ``dvc repro
        preprocess``). ValueError: an unknown split name, or arrays that disagree with the manifest or each
        other (count, dtype,
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
                raise ValueError(
                    f"{processed_dir / name}: sha256 differs from the manifest (modified or "
                    f"corrupted); {_RUN_PREPROCESS} again"
                )

    def read(name: str) -> np.ndarray | None:
        file_name = f"{split}_{name}.npy"
        if file_name not in expected_files:
            return None
        return np.load(processed_dir / file_name, mmap_mode="r" if mmap else None, allow_pickle=False)

    images = read("images")
    if images is None:
        raise FileNotFoundError(
            f"{processed_dir / f'{split}_images.npy'} is not in the manifest; {_RUN_PREPROCESS} again"
        )
    count = entry.get("count")
    shape = tuple(manifest.get("image_shape", images.shape[1:]))
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != shape or len(images) != count:
        raise ValueError(
            f"{processed_dir / f'{split}_images.npy'}: {images.dtype} {images.shape}, the manifest "
            f"says uint8 ({count}, {', '.join(map(str, shape))}); {_RUN_PREPROCESS} again"
        )
    result = Split(
        images,
        read("attributes"),
        list(manifest.get("attribute_names", [])),
        read("labels"),
        read("identity"),
        split,
        manifest.get("dataset", ""),
    )
    for name in ("attributes", "labels", "identity"):
        array = getattr(result, name)
        if array is not None and len(array) != len(images):
            raise ValueError(
                f"{processed_dir / f'{split}_{name}.npy'} has {len(array)} rows for {len(images)} "
                f"images; {_RUN_PREPROCESS} again"
            )
    return result


def dataset_folder(location: Path | str, endpoint: str | None = None) -> Path:
    """The local folder to read a dataset from: ``location`` itself when it is a path; for a URI
    (``s3://bucket/processed/celeba``) this node's verified cached copy
    (:func:`pipeline.storage.local_dataset`).

    Raises:
        FileNotFoundError: no manifest at the URI (run the preprocess stage).
        pipeline.storage_access.StorageError: the store is unreachable or the data do not match their
            manifest.
    """
    return storage.local_dataset(location, endpoint)


def data_hashes(processed_dir: Path) -> dict[str, str]:
    """The content hashes of the preprocessed arrays from the preprocess stage's manifest ({} without one)."""
    manifest_path = processed_dir / "manifest.json"
    if not manifest_path.is_file():
        return {}
    return manifest_hashes(json.loads(manifest_path.read_text()))


def location_hashes(location: Path | str, endpoint: str | None = None) -> dict[str, str]:
    """:func:`data_hashes` of a dataset at a path or URI, reading only its manifest ({} without one)."""
    if not storage_access.is_uri(location):
        return data_hashes(Path(location))
    try:
        text = storage.read_bytes(storage.join(str(location), MANIFEST), endpoint, patient=False)
        return manifest_hashes(json.loads(text))
    except FileNotFoundError:
        return {}


def manifest_hashes(manifest: dict[str, Any]) -> dict[str, str]:
    """``{"data.sha256.<file>": sha256}`` for every array of a manifest (MLflow tags and run names)."""
    hashes = {}
    for split, info in manifest.get("splits", {}).items():
        for name, digest in (info.get("files") or {}).items():
            hashes[f"data.sha256.{name}" if name.startswith(split) else f"data.sha256.{split}.{name}"] = str(
                digest
            )
    return hashes


def load_images(processed_dir: Path | str, split: str) -> np.ndarray:
    """The memory-mapped uint8 (N, C, H, W) image array of one split (``{split}_images.npy``).

    Raises:
        FileNotFoundError: the array is missing (the message says which stage to run).
    """
    path = Path(processed_dir) / f"{split}_images.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the preprocess stage first (`dvc repro preprocess`)")
    return np.load(path, mmap_mode="r", allow_pickle=False)


def training_indices(
    num_images: int, local_batch_size: int, epoch: int, seed: int, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """This rank's image indices for one training epoch, in batch order.

    The epoch's order is a permutation of ``range(num_images)`` drawn from ``(seed, epoch)``, the same on
    every rank. Global batch t is positions [t B, (t + 1) B) of it, B = ``local_batch_size * world_size``, and
    rank r takes every ``world_size``-th position starting at r (as PyTorch's ``DistributedSampler``). So a
    global batch holds the same images whatever the number of workers, the ranks' shares are disjoint, and
    every rank takes the same number of steps, ``num_images // B`` (the ragged end is dropped; it differs
    every epoch).

    Returns:
        int64 (steps * local_batch_size,) indices: batch t of this rank is ``[t * local_batch_size, ...)``.
    Raises:
        ValueError: local_batch_size < 1, or rank outside [0, world_size).
    """
    _check_rank(local_batch_size, rank, world_size)
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    steps = num_images // (local_batch_size * world_size)
    return order[: steps * local_batch_size * world_size][rank::world_size]


def evaluation_indices(num_images: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
    """This rank's share of an evaluation split: ``rank, rank + world_size, ...``, so that the ranks together
    see every image exactly once (shares differ in length by at most one; nothing is padded or dropped).

    Raises:
        ValueError: rank outside [0, world_size).
    """
    _check_rank(1, rank, world_size)
    return np.arange(rank, num_images, world_size)


def _check_rank(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class BatchSource:
    """Yields uint8 batches (B, C, H, W) on ``device`` from a uint8 (N, C, H, W) array.

    ``on_device=True`` copies the array to the device once; each batch is then a gather on the device (the
    data path of GPU training: no host work per step). Otherwise each batch is gathered (sorted indices, for
    locality) from the memory map on the CPU and, on a GPU, moved with a non-blocking copy from pinned memory.
    """

    def __init__(self, images: np.ndarray, device: torch.device, on_device: bool):
        self.num_images = images.shape[0]
        self.device = device
        self.on_device = on_device
        self.host = images
        self.resident = torch.from_numpy(np.ascontiguousarray(images)).to(device) if on_device else None

    def batches(
        self, indices: np.ndarray, batch_size: int, max_batches: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Full batches in ``indices`` order (at most ``max_batches``); a ragged end is dropped (training)."""
        count = len(indices) // batch_size
        count = min(count, max_batches) if max_batches else count
        yield from self._gathered(indices, batch_size, count * batch_size)

    def all_batches(self, indices: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
        """Every index once, the last batch possibly short (evaluation)."""
        yield from self._gathered(indices, batch_size, len(indices))

    def _gathered(self, indices: np.ndarray, batch_size: int, stop: int) -> Iterator[torch.Tensor]:
        # Each batch holds its images in index order, on either path: the same rows in the same order (the
        # same float sums, the same noise per image) whether the split lives on the device or is read
        # forward from the memory map.
        ordered = np.array(indices[:stop], dtype=np.int64)
        for start in range(0, stop, batch_size):
            ordered[start : start + batch_size].sort()
        if self.resident is not None:
            on_device = torch.from_numpy(ordered).to(self.device)
            for start in range(0, stop, batch_size):
                yield self.resident.index_select(0, on_device[start : start + batch_size])
            return
        for start in range(0, stop, batch_size):
            batch = torch.from_numpy(self.host[ordered[start : start + batch_size]])
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            yield batch
