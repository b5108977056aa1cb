"""Preprocess stage: ``data/raw/<dataset>/`` -> compact uint8 arrays per split in ``data/processed/``:
``{split}_images.npy`` (N, C, H, W), the row-aligned labels, attributes and identities, and ``manifest.json``
with every array's sha256. Decoded once, so that training reads memory-mapped arrays instead of JPEGs; written
into a temporary folder and renamed into place when complete. See README, Data.

    python -m pipeline.preprocess [--params params.yaml]
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import shutil
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from pipeline import datasets as ds
from pipeline import storage, storage_access
from pipeline.celeba import RUN_DVC_DOWNLOAD, decode_chunk, read_celeba_annotations
from pipeline.cli import data_stage_main
from pipeline.common import atomic_output
from pipeline.datasets import DataStageError
from pipeline.image_folder_stage import preprocess_image_folder
from pipeline.job_submission import run_data_stage
from pipeline.processed_folder import (
    _input_checksums,
    _manifest,
    _OutputFolder,
    _write_manifest,
    map_in_processes,
    worker_count,
)

if TYPE_CHECKING:
    from pipeline.config import DataConfig, Params, PreprocessConfig

log = logging.getLogger("pipeline.preprocess")

CHUNK_IMAGES = 256  # images per task sent to a decode process


# ------------------------------------------------------------------------------------------------ CelebA


def preprocess_celeba(
    raw_root: Path,
    out_dir: Path,
    *,
    image_size: int = 64,
    crop_size: int = 148,
    skip_corrupt: bool = False,
    fast_decode: bool = False,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Decode, crop and resize every CelebA image once; write the split arrays and the manifest.

    Args:
        raw_root: ``data/raw/celeba`` (holding ``celeba/img_align_celeba.zip`` and the .txt files).
        out_dir: ``data/processed/celeba``; replaced atomically when everything is written.
        image_size: output side (64; 128 works); crop_size: the centred square cut first (148).
        skip_corrupt: leave undecodable images out (listed in the manifest) instead of failing.
        fast_decode: DCT-domain downscaled decoding (see the module docstring).
        num_workers: decode processes; 0 = all cores of this machine; 1 = in this process. More than one uses
            spawned processes: a script calling this must guard its top level with
            ``if __name__ == "__main__":`` (the workers import the main module, as with spawn).
    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    Raises:
        DataStageError: missing inputs (says to run the download stage), malformed annotations, an image
            listed in the partition file but absent from the zip, or a corrupt image (named) without
            ``skip_corrupt``.
    """
    from pipeline.archives import celeba_image_entries

    folder = raw_root / ds.CELEBA_FOLDER
    archive_path = folder / ds.CELEBA_ZIP
    if not archive_path.is_file():
        raise DataStageError(f"{archive_path} is missing; {RUN_DVC_DOWNLOAD}")
    annotations = read_celeba_annotations(folder)
    try:
        with zipfile.ZipFile(archive_path) as archive:
            entries = celeba_image_entries(archive, str(archive_path))
    except zipfile.BadZipFile as error:
        raise DataStageError(
            f"{archive_path} is not a valid zip ({error}); delete it and {RUN_DVC_DOWNLOAD}"
        ) from None
    missing = [name for name in annotations.names if name not in entries]
    if missing:
        raise DataStageError(
            f"{archive_path} lacks {len(missing)} image(s) listed in {ds.CELEBA_PARTITION} "
            f"(e.g. {', '.join(missing[:3])}); delete it and {RUN_DVC_DOWNLOAD}"
        )
    inputs = [archive_path] + [folder / name for name in ds.CELEBA_ANNOTATIONS if (folder / name).is_file()]
    sources = _input_checksums(inputs, raw_root / "sources.json")

    split_of = [ds.CELEBA_SPLIT_CODES[int(code)] for code in annotations.split]
    counts = {split: split_of.count(split) for split in ds.SPLITS}
    workers = worker_count(num_workers)
    output = _OutputFolder(out_dir)
    try:
        arrays = {
            split: np.lib.format.open_memmap(
                output.path / f"{split}_images.npy",
                mode="w+",
                dtype=np.uint8,
                shape=(counts[split], 3, image_size, image_size),
            )
            for split in ds.SPLITS
        }
        cursor = dict.fromkeys(ds.SPLITS, 0)
        kept_rows: dict[str, list[int]] = {split: [] for split in ds.SPLITS}
        skipped: list[str] = []
        names = annotations.names
        tasks = [
            (str(archive_path), names[start : start + CHUNK_IMAGES], image_size, crop_size, fast_decode)
            for start in range(0, len(names), CHUNK_IMAGES)
        ]
        log.info(
            "decoding %d images from %s on %d process(es): crop %d, resize to %d%s",
            len(names),
            archive_path.name,
            workers,
            crop_size,
            image_size,
            " (fast decode)" if fast_decode else "",
        )
        results = map_in_processes(decode_chunk, tasks, workers)
        try:
            with tqdm(total=len(names), desc="preprocess celeba", unit="img", disable=None) as bar:
                for task_index, (images, errors) in enumerate(results):
                    start = task_index * CHUNK_IMAGES
                    bad = dict(errors)
                    if bad and not skip_corrupt:
                        details = "; ".join(
                            f"{names[start + i]}: {message}" for i, message in sorted(bad.items())
                        )
                        raise DataStageError(
                            f"corrupt image(s) in {archive_path}: {details}. "
                            "The download stage checked the zip's "
                            "checksum, so the archive itself holds a bad file: fetch a good copy, or set "
                            "preprocess.skip_corrupt: true to leave such images out (they are listed in the "
                            "manifest)."
                        )
                    for offset in range(len(images)):
                        row = start + offset
                        if offset in bad:
                            skipped.append(names[row])
                            log.warning("skipping corrupt %s: %s", names[row], bad[offset])
                            continue
                        split = split_of[row]
                        arrays[split][cursor[split]] = images[offset]
                        cursor[split] += 1
                        kept_rows[split].append(row)
                    bar.update(len(images))
        finally:
            results.close()

        for split in ds.SPLITS:
            array = arrays.pop(split)
            array.flush()
            if cursor[split] != counts[split]:  # some images skipped: rewrite at the exact length
                with atomic_output(output.path / f"{split}_images.npy") as tmp:
                    final = np.lib.format.open_memmap(
                        tmp, mode="w+", dtype=np.uint8, shape=(cursor[split], 3, image_size, image_size)
                    )
                    final[:] = array[: cursor[split]]
                    final.flush()
                    del final
            del array
            rows = np.asarray(kept_rows[split], np.int64)
            output.save(f"{split}_attributes.npy", annotations.attributes[rows])
            output.save(f"{split}_identity.npy", annotations.identity[rows])
        manifest = _manifest(
            output.path,
            "celeba",
            (3, image_size, image_size),
            annotations.attribute_names,
            cursor,
            sources,
            {
                "crop_size": crop_size,
                "image_size": image_size,
                "fast_decode": fast_decode,
                "skip_corrupt": skip_corrupt,
                "method": "Pillow decode, center crop (torchvision "
                "CenterCrop rounding), antialiased bilinear resize "
                "(= torchvision CenterCrop + Resize(antialias=True) on PIL images)",
                "split": f"official {ds.CELEBA_PARTITION}",
            },
            skipped,
        )
        _write_manifest(output.path, manifest)
        output.publish()
    except BaseException:
        output.discard()
        raise
    log.info(
        "wrote %s: %s",
        out_dir,
        ", ".join(f"{s} {cursor[s]}" for s in ds.SPLITS)
        + (f"; skipped {len(skipped)} corrupt image(s)" if skipped else ""),
    )
    return manifest


# ------------------------------------------------------------------------------------------ MNIST family


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes: images (N, rows, cols) or labels (N,), uint8.

    Raises:
        DataStageError: not gzip, a wrong magic number (only type 0x08, unsigned byte, is used by MNIST), or a
        size
            that does not match the header.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:
        raise DataStageError(f"{path}: not a valid gzip file ({error}); {RUN_DVC_DOWNLOAD}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise DataStageError(
            f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()}, expected "
            "00000801 or 00000803)"
        )
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(dims):
        raise DataStageError(
            f"{path}: header says {dims} = {math.prod(dims)} bytes, file has {len(raw) - offset}"
        )
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims)


def preprocess_mnist_family(dataset: str, raw_root: Path, out_dir: Path) -> dict[str, Any]:
    """Write MNIST or Fashion-MNIST as (N, 1, 28, 28) uint8 images and (N,) uint8 labels per split.

    Splits: train = the first 55,000 official training images, valid = the last 5,000, test = the official
    10,000 test images. The bytes are those of the IDX files, unchanged.

    Raises:
        DataStageError: missing or malformed input files (says to run the download stage).
    """
    paths = {name: raw_root / name for name in ds.MNIST_FAMILY_FILES[dataset]}
    for path in paths.values():
        if not path.is_file():
            raise DataStageError(f"{path} is missing; {RUN_DVC_DOWNLOAD}")
    train_images = read_idx(paths[ds.MNIST_TRAIN_IMAGES])
    train_labels = read_idx(paths[ds.MNIST_TRAIN_LABELS])
    test_images = read_idx(paths[ds.MNIST_TEST_IMAGES])
    test_labels = read_idx(paths[ds.MNIST_TEST_LABELS])
    for images, labels, count, what in (
        (train_images, train_labels, 60_000, "training"),
        (test_images, test_labels, 10_000, "test"),
    ):
        if images.shape != (count, 28, 28) or labels.shape != (count,):
            raise DataStageError(
                f"{dataset} {what} set: images {images.shape} and labels {labels.shape}, expected "
                f"({count}, 28, 28) and ({count},)"
            )
    cut = ds.MNIST_TRAIN_COUNT
    splits = {
        "train": (train_images[:cut], train_labels[:cut]),
        "valid": (train_images[cut:], train_labels[cut:]),
        "test": (test_images, test_labels),
    }
    sources = _input_checksums(list(paths.values()), raw_root / "sources.json")
    output = _OutputFolder(out_dir)
    try:
        for split, (images, labels) in splits.items():
            output.save(f"{split}_images.npy", images[:, None, :, :])
            output.save(f"{split}_labels.npy", labels)
        manifest = _manifest(
            output.path,
            dataset,
            ds.MNIST_IMAGE_SHAPE,
            [],
            {split: len(labels) for split, (_, labels) in splits.items()},
            sources,
            {
                "split": "train = first 55,000 official training images, valid = last 5,000 "
                "official training images, test = official 10,000 test images",
                "method": "IDX bytes unchanged, reshaped to (N, 1, 28, 28)",
            },
            [],
        )
        _write_manifest(output.path, manifest)
        output.publish()
    except BaseException:
        output.discard()
        raise
    log.info("wrote %s: %s", out_dir, ", ".join(f"{s} {len(splits[s][1])}" for s in ds.SPLITS))
    return manifest


def preprocess(data: DataConfig, config: PreprocessConfig, endpoint: str | None = None,
               engine: str = "processes") -> dict[str, Any]:
    """Run the preprocess stage for ``data.dataset``: ``data.raw_path()`` -> ``data.processed_location()``.

    With ``data.processed_dir`` an object-store URI (``s3://bucket/processed``), the arrays are built in a
    local scratch folder and then published there (arrays first, manifest.json last: a reader that finds the
    manifest finds its arrays); ``endpoint`` is ``cluster.s3_endpoint_url``. ``engine`` ("processes" or
    "ray_data", see :func:`resolve_engine`) decodes an image folder.

    Returns the manifest. Raises DataStageError (see :func:`preprocess_celeba`,
    :func:`preprocess_mnist_family`, :func:`pipeline.image_folder_stage.preprocess_image_folder`), or
    StorageError when the store refuses.
    """
    location = data.processed_location()
    if storage_access.is_uri(location):
        storage_access.check_location(location, endpoint, "data.processed_dir")
        scratch = storage.scratch_folder(location)
        try:
            manifest = _build(data, config, scratch / data.dataset, engine, endpoint)
            storage.publish_dataset(scratch / data.dataset, location, endpoint)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return manifest
    return _build(data, config, data.processed_path(), engine, endpoint)


def _build(data: DataConfig, config: PreprocessConfig, out_dir: Path, engine: str = "processes",
           endpoint: str | None = None) -> dict[str, Any]:
    if data.dataset == "image_folder":
        return preprocess_image_folder(
            data.image_folder_location(),
            out_dir,
            image_size=data.image_size,
            channels=data.channels,
            crop=data.crop,
            split_fractions=data.split_fractions.model_dump(),
            class_folders=data.class_folders,
            attributes_csv=data.attributes_csv,
            skip_corrupt=config.skip_corrupt,
            num_workers=config.num_workers,
            engine=engine,
            endpoint=endpoint,
        )
    if data.dataset == "celeba":
        return preprocess_celeba(
            data.raw_path(),
            out_dir,
            image_size=data.image_size,
            crop_size=config.crop_size,
            skip_corrupt=config.skip_corrupt,
            fast_decode=config.fast_decode,
            num_workers=config.num_workers,
        )
    return preprocess_mnist_family(data.dataset, data.raw_path(), out_dir)


def resolve_engine(params: Params) -> str:
    """``preprocess.engine`` made concrete: "ray_data" (connected to the cluster here) or "processes". auto:
    Ray Data for an image folder when a cluster is configured (``cluster.address`` or ``RAY_ADDRESS``, which
    a submitted job has), else local processes. CelebA and the MNIST family always use processes."""
    choice = params.preprocess.engine
    if params.data.dataset != "image_folder":
        return "processes"
    if choice == "auto":
        choice = "ray_data" if params.cluster.address or os.environ.get("RAY_ADDRESS") else "processes"
    if choice == "ray_data":
        from pipeline.ray_connect import connect_ray

        connect_ray(params)
    return choice


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.preprocess [--params PATH]``: exit status 0, or 1 with a message on stderr."""
    def run(params):
        return preprocess(params.data, params.preprocess, params.cluster.s3_endpoint_url,
                          resolve_engine(params))

    return data_stage_main("pipeline.preprocess", __doc__, argv, run, log,
                           interrupted="nothing was written (outputs are renamed into place when complete)",
                           submit=run_data_stage)


if __name__ == "__main__":
    sys.exit(main())
