"""The preprocess stage for ``data.dataset: image_folder``: every image of a folder or ``s3://`` prefix read,
hashed and decoded once (pipeline/image_folder.py), by local processes or by Ray Data tasks on every node of
the cluster, then written as CelebA's are: uint8 split arrays and a manifest, renamed into place when
complete.

Both engines run the same per-file function (:func:`pipeline.image_folder.decode_files`) and the driver places
each result at the row of its file in the sorted listing, so the arrays are the same bytes whichever engine,
node count or task order made them (tested).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline import datasets as ds
from pipeline import storage_access
from pipeline.datasets import DataStageError
from pipeline.image_folder import (
    IMAGE_EXTENSIONS,
    check_split_counts,
    class_labels,
    decode_files,
    list_images,
    read_attributes_csv,
    split_of,
)
from pipeline.processed_folder import (
    _manifest,
    _OutputFolder,
    _write_manifest,
    map_in_processes,
    worker_count,
)

log = logging.getLogger("pipeline.preprocess")

CHUNK_FILES = 128  # files per decode task (a process's task, or a Ray Data batch)
WRITE_BLOCK = 4096  # rows copied at a time from the scratch array into a split's array


def _decode_task(task: tuple[str, list[str], int, int, str, str | None]) -> dict[str, np.ndarray]:
    return decode_files(*task)


def _decode_batch(batch: dict[str, np.ndarray], *, location: str, image_size: int, channels: int, crop: str,
                  endpoint: str | None) -> dict[str, np.ndarray]:
    """A Ray Data ``map_batches`` function: decode the batch's files (column ``name``); adds ``node``."""
    import ray

    columns = decode_files(location, [str(name) for name in batch["name"]], image_size, channels, crop,
                           endpoint)
    columns["node"] = np.full(len(batch["name"]), ray.get_runtime_context().get_node_id(), dtype=object)
    return columns


def decoded_in_processes(location: str, names: list[str], options: dict[str, Any], endpoint: str | None,
                         num_workers: int) -> Iterator[dict[str, np.ndarray]]:
    """The decoded columns of every file, in chunks, from ``num_workers`` local processes (0: all cores)."""
    workers = worker_count(num_workers)
    log.info("decoding %d images from %s on %d process(es)", len(names), location, workers)
    tasks = [(location, names[start : start + CHUNK_FILES], options["image_size"], options["channels"],
              options["crop"], endpoint) for start in range(0, len(names), CHUNK_FILES)]
    results = map_in_processes(_decode_task, tasks, workers)
    try:
        yield from results
    finally:
        results.close()


def decoded_with_ray_data(location: str, names: list[str], options: dict[str, Any], endpoint: str | None
                          ) -> Iterator[dict[str, np.ndarray]]:
    """The decoded columns of every file, from Ray Data: the names are split into blocks, each decoded by a
    ``map_batches`` task on whichever node has a free CPU, streamed back to this process in bounded memory
    (Ray Data's backpressure). Needs ``ray.init`` done (the stage connects to ``cluster.address``). Local
    folders must be readable at the same path on every node (one machine, or a shared file system); an
    ``s3://`` prefix is read by each node from the store."""
    import ray

    dataset = ray.data.from_items([{"name": name} for name in names],
                                  override_num_blocks=max(1, -(-len(names) // CHUNK_FILES)))
    # SPREAD: the tasks go round the nodes, using every node's CPUs and disk or network
    decoded = dataset.map_batches(
        _decode_batch, batch_size=CHUNK_FILES, batch_format="numpy", num_cpus=1, scheduling_strategy="SPREAD",
        fn_kwargs={"location": location, "endpoint": endpoint, **options})
    nodes: Counter = Counter()
    for batch in decoded.iter_batches(batch_size=None, batch_format="numpy"):
        nodes.update(str(node) for node in batch.pop("node"))
        yield batch
    log.info("Ray Data decoded %d images on %d node(s): %s", sum(nodes.values()), len(nodes),
             ", ".join(f"{node[:8]} {count}" for node, count in sorted(nodes.items())))


def preprocess_image_folder(
    location: str | Path,
    out_dir: Path,
    *,
    image_size: int = 64,
    channels: int = 3,
    crop: str = "center",
    split_fractions: dict[str, float] | None = None,
    class_folders: bool = False,
    attributes_csv: str | None = None,
    skip_corrupt: bool = False,
    num_workers: int = 0,
    engine: str = "processes",
    endpoint: str | None = None,
) -> dict[str, Any]:
    """Decode every image of a folder once; write the split arrays and the manifest as for CelebA.

    Writes ``{split}_images.npy`` (N, channels, image_size, image_size) uint8, ``{split}_labels.npy`` (N,)
    int64 with ``class_folders``, ``{split}_attributes.npy`` (N, A) uint8 with ``attributes_csv``, and
    ``manifest.json``: every source file's size, sha256 and where it went (split and row) or why not, the
    files that are not images, the exact duplicates (the first path in sorted order is kept, the others left
    out, so no content is in two splits), the mode conversions made, the split rule and every array's sha256.
    Rows follow the sorted relative paths within each split. ``out_dir`` is replaced atomically.

    Args:
        location: the image folder (recursive) or ``s3://bucket/prefix``.
        split_fractions: {"train", "valid", "test"} fractions (summing to 1); default 0.8 / 0.1 / 0.1.
        attributes_csv: a CSV in the folder, relative to it (see
            :func:`pipeline.image_folder.read_attributes_csv`).
        num_workers: decode processes with ``engine="processes"``; 0 = all cores; 1 = in this process (see
            :func:`pipeline.processed_folder.map_in_processes` for scripts).
        engine: "processes" (this machine) or "ray_data" (tasks on the connected Ray cluster).
        endpoint: the S3 endpoint for an ``s3://`` location (``cluster.s3_endpoint_url``).
    Returns:
        The manifest.
    Raises:
        DataStageError: see :func:`pipeline.image_folder.list_images`, ``class_labels``,
            ``read_attributes_csv``, ``check_split_counts``; no image in the folder; a corrupt, truncated,
            unreadable or oversized image (every one named) without ``skip_corrupt``.
        pipeline.storage_access.StorageError: an s3 location that cannot be listed.
    """
    fractions = split_fractions or {"train": 0.8, "valid": 0.1, "test": 0.1}
    endpoint = storage_access.endpoint_url(endpoint) if storage_access.is_uri(str(location)) else None
    listing = list_images(str(location), endpoint)
    location, names = listing.root, listing.images
    if listing.other_files:
        log.warning("%d file(s) in %s are not images (by extension) and are left out: %s%s",
                    len(listing.other_files), location, ", ".join(listing.other_files[:10]),
                    " ..." if len(listing.other_files) > 10 else "")
    if not names:
        raise DataStageError(
            f"no images in {location} (looked for {', '.join(IMAGE_EXTENSIONS)} in every subfolder; found "
            f"{len(listing.other_files)} other file(s)); point data.image_folder at a folder of images"
        )
    attribute_names: list[str] = []
    attributes = None
    if attributes_csv is not None:
        attribute_names, attributes = read_attributes_csv(location, attributes_csv, names, endpoint)
    labels = class_labels(names, location) if class_folders else None
    shape = (channels, image_size, image_size)
    options = {"image_size": image_size, "channels": channels, "crop": crop}
    row_of = {name: row for row, name in enumerate(names)}
    output = _OutputFolder(out_dir)
    try:
        scratch_path = output.path / "all_images.scratch"
        everything = np.lib.format.open_memmap(scratch_path, mode="w+", dtype=np.uint8,
                                               shape=(len(names), *shape))
        digests = np.full(len(names), "", dtype=object)
        sizes = np.zeros(len(names), np.int64)
        errors: dict[int, str] = {}
        conversions: Counter = Counter()
        chunks = (decoded_with_ray_data(location, names, options, endpoint) if engine == "ray_data"
                  else decoded_in_processes(location, names, options, endpoint, num_workers))
        with tqdm(total=len(names), desc="preprocess images", unit="img", disable=None) as bar:
            for chunk in chunks:
                rows = np.asarray([row_of[str(name)] for name in chunk["name"]], np.int64)
                everything[rows] = chunk["image"]
                digests[rows] = chunk["sha256"]
                sizes[rows] = chunk["size"]
                for row, error, conversion in zip(rows, chunk["error"], chunk["conversion"], strict=True):
                    if error:
                        errors[int(row)] = str(error)
                    elif conversion:
                        conversions[str(conversion)] += 1
                bar.update(len(rows))
        if errors and not skip_corrupt:
            details = "; ".join(f"{names[row]}: {message}" for row, message in sorted(errors.items())[:10])
            raise DataStageError(
                f"{len(errors)} image(s) in {location} cannot be used: {details}"
                f"{' ...' if len(errors) > 10 else ''}. Replace or remove them, or set "
                "preprocess.skip_corrupt: true to leave them out (they are listed in the manifest)"
            )
        for row, message in sorted(errors.items()):
            log.warning("skipping %s: %s", names[row], message)
        if conversions:
            log.info("converted: %s", ", ".join(f"{key} {n}" for key, n in sorted(conversions.items())))
        rows_of, duplicates = _assign_splits(names, digests, errors, fractions)
        counts = {split: len(rows) for split, rows in rows_of.items()}
        check_split_counts(counts, fractions, location)
        for split, rows in rows_of.items():
            index = np.asarray(rows, np.int64)
            array = np.lib.format.open_memmap(output.path / f"{split}_images.npy", mode="w+", dtype=np.uint8,
                                              shape=(len(rows), *shape))
            for start in range(0, len(rows), WRITE_BLOCK):  # bounded memory: a block of rows at a time
                array[start : start + WRITE_BLOCK] = everything[index[start : start + WRITE_BLOCK]]
            array.flush()
            del array
            if labels is not None:
                output.save(f"{split}_labels.npy", labels[1][index])
            if attributes is not None:
                output.save(f"{split}_attributes.npy", attributes[index])
        del everything
        scratch_path.unlink()
        manifest = _manifest(
            output.path, "image_folder", shape, attribute_names, counts,
            _source_records(names, digests, sizes, rows_of, duplicates, errors),
            _settings(location, options, fractions, skip_corrupt, conversions),
            [names[row] for row in sorted(errors)],
        )
        manifest.update(other_files=listing.other_files, duplicates=duplicates)
        if labels is not None:
            manifest["class_names"] = labels[0]
        _write_manifest(output.path, manifest)
        output.publish()
    except BaseException:
        output.discard()
        raise
    log.info("wrote %s: %s", out_dir, ", ".join(f"{s} {counts[s]}" for s in ds.SPLITS))
    return manifest


def _assign_splits(names: list[str], digests: np.ndarray, errors: dict[int, str], fractions: dict[str, float]
                   ) -> tuple[dict[str, list[int]], dict[str, list[str]]]:
    """Rows of each split (usable files, each content once: its first path) and the duplicates left out."""
    first_with: dict[str, int] = {}
    duplicates: dict[str, list[str]] = {}
    rows_of: dict[str, list[int]] = {split: [] for split in ds.SPLITS}
    for row, name in enumerate(names):
        if row in errors:
            continue
        if digests[row] in first_with:
            duplicates.setdefault(names[first_with[digests[row]]], []).append(name)
            continue
        first_with[digests[row]] = row
        rows_of[split_of(name, fractions)].append(row)
    if duplicates:
        log.warning("%d exact duplicate(s) left out (each content kept once, under its first path): %s",
                    sum(map(len, duplicates.values())),
                    "; ".join(f"{kept} = {', '.join(copies)}"
                              for kept, copies in list(duplicates.items())[:5]))
    return rows_of, duplicates


def _source_records(names: list[str], digests: np.ndarray, sizes: np.ndarray, rows_of: dict[str, list[int]],
                    duplicates: dict[str, list[str]], errors: dict[int, str]) -> dict[str, dict[str, Any]]:
    """Every file: its size, sha256 and where it went (split, row), or why it is not in the arrays."""
    sources: dict[str, dict[str, Any]] = {
        name: {"size": int(sizes[row]), "sha256": str(digests[row])} for row, name in enumerate(names)}
    for split, rows in rows_of.items():
        for position, row in enumerate(rows):
            sources[names[row]].update(split=split, row=position)
    for kept, copies in duplicates.items():
        for name in copies:
            sources[name]["duplicate_of"] = kept
    for row, message in errors.items():
        sources[names[row]]["skipped"] = message
    return sources


def _settings(location: str, options: dict[str, Any], fractions: dict[str, float], skip_corrupt: bool,
              conversions: Counter) -> dict[str, Any]:
    centre = options["crop"] == "center"
    return {
        "image_folder": location,
        **options,
        "skip_corrupt": skip_corrupt,
        "method": "Pillow decode, EXIF orientation, mode -> " + ("RGB" if options["channels"] == 3 else "L")
        + (", centre square of the shorter side (torchvision CenterCrop rounding)" if centre else "")
        + ", antialiased bilinear resize (= torchvision "
        + ("CenterCrop + Resize(antialias=True)" if centre else "Resize((s, s))") + " on PIL images)",
        "split": "sha256 of the relative path, first 8 bytes / 2**64 = u: train if u < "
        f"{fractions['train']}, valid if u < {fractions['train'] + fractions['valid']}, else test",
        "split_fractions": fractions,
        "conversions": dict(sorted(conversions.items())),
    }
