"""Preprocess stage: turn ``data/raw/<dataset>/`` into compact uint8 arrays per split in
``data/processed/<dataset>/``, decoded once so that training reads memory-mapped arrays instead of JPEGs.

Run it as ``python -m pipeline.preprocess [--params params.yaml]`` (the DVC stage ``preprocess``). It reads the
``data`` and ``preprocess`` sections of params.yaml.

Output, per split in (train, valid, test)::

    {split}_images.npy      uint8 (N, C, H, W), C=3 H=W=data.image_size for CelebA, (N, 1, 28, 28) for MNIST
    {split}_attributes.npy  CelebA: uint8 (N, 40) in {0, 1}, row-aligned with the images
    {split}_identity.npy    CelebA: int32 (N,), the person's id from identity_CelebA.txt
    {split}_labels.npy      MNIST family: uint8 (N,) class labels
    manifest.json           dataset, image_shape, attribute_names, per-split counts and sha256 of every array,
                            checksums of the inputs, the preprocessing parameters, skipped (corrupt) files

CelebA: the official partition (``list_eval_partition.txt``: 162,770 / 19,867 / 19,962 images); each image is
decoded, center-cropped to ``preprocess.crop_size`` (148) and resized to ``data.image_size`` with an antialiased
bilinear filter. This is exactly what ``torchvision.transforms.CenterCrop(148)`` + ``Resize(64, antialias=True)``
do on the PIL images that ``torchvision.datasets.CelebA`` returns (both run Pillow's resampling; the tests check
equality to the byte). The images are read from ``img_align_celeba.zip`` itself (the file DVC tracks), decoded in
parallel on all cores (``preprocess.num_workers``). ``preprocess.fast_decode`` lets libjpeg decode at half
resolution in the DCT domain when the output is at most half the crop (64 from 148), about twice as fast; the
tests bound its difference from the exact path (mean absolute difference below 2 grey levels of 255).

MNIST / Fashion-MNIST: train = the first 55,000 images of the official training set, valid = its last 5,000,
test = the official 10,000 test images; the arrays hold the IDX bytes unchanged.

A corrupt or truncated JPEG stops the stage with an error naming the file, unless ``preprocess.skip_corrupt``
(then it is left out, its attribute and identity rows too, and listed in the manifest). Everything is written
into a temporary folder beside the output and renamed into place when complete: a failed or interrupted run leaves
no partial output that a later stage could read.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from pipeline import datasets as ds
from pipeline.common import run_stage, stage_argument_parser
from pipeline.datasets import DataStageError

if TYPE_CHECKING:
    from pipeline.config import DataConfig, PreprocessConfig

log = logging.getLogger("pipeline.preprocess")

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
CHUNK_IMAGES = 256  # images per task sent to a decode process
_RUN_DVC_DOWNLOAD = "run `dvc repro download` (or `python -m pipeline.download`) first"


# --------------------------------------------------------------------------------------------- images


def center_crop_box(width: int, height: int, crop_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred ``crop_size`` square, rounded as torchvision's ``CenterCrop``
    rounds it (``int(round((height - crop) / 2))``; 178x218 and 148 give (15, 35, 163, 183))."""
    top = int(round((height - crop_size) / 2.0))
    left = int(round((width - crop_size) / 2.0))
    return left, top, left + crop_size, top + crop_size


def transform_celeba_image(data: bytes, image_size: int, crop_size: int = 148, fast_decode: bool = False
                           ) -> np.ndarray:
    """Decode one JPEG, center-crop it to ``crop_size`` and resize it to ``image_size`` (antialiased bilinear).

    Args:
        data: the JPEG file's bytes.
        image_size: output side in pixels.
        crop_size: side of the centred square cut from the image first.
        fast_decode: let libjpeg decode at 1/2, 1/4 or 1/8 scale in the DCT domain when the output is small
            enough, then resize from the scaled crop (approximate: see the module docstring).
    Returns:
        uint8 array (3, image_size, image_size), channels RGB.
    Raises:
        ValueError: the bytes are not a decodable image (corrupt, truncated), or it is smaller than the crop.
    """
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width < crop_size or height < crop_size:
            raise ValueError(f"image is {width}x{height}, smaller than the {crop_size} crop")
        box = center_crop_box(width, height, crop_size)
        scale = 1
        if fast_decode and image.format == "JPEG":
            wanted = image_size / crop_size
            image.draft("RGB", (math.ceil(width * wanted), math.ceil(height * wanted)))
            scale = round(width / image.size[0])
        image.load()  # decodes; fails on truncated or corrupt data
        if image.mode != "RGB":
            image = image.convert("RGB")
    except ValueError:
        raise
    except Exception as error:  # PIL raises OSError, SyntaxError, UnidentifiedImageError, DecompressionBomb...
        raise ValueError(f"cannot decode: {error}") from None
    if scale == 1:
        image = image.crop(box).resize((image_size, image_size), Image.Resampling.BILINEAR)
    else:
        scaled_box = tuple(coordinate / scale for coordinate in box)
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=scaled_box)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


_open_archives: dict[str, zipfile.ZipFile] = {}


def _decode_chunk(task: tuple[str, list[str], int, int, bool]) -> tuple[np.ndarray, list[tuple[int, str]]]:
    """Worker: decode the images ``names`` of the archive. Returns (images (n, 3, S, S), [(index, error)])."""
    archive_path, names, image_size, crop_size, fast_decode = task
    archive = _open_archives.get(archive_path)
    if archive is None:
        archive = _open_archives[archive_path] = zipfile.ZipFile(archive_path)
    out = np.zeros((len(names), 3, image_size, image_size), np.uint8)
    errors = []
    for index, name in enumerate(names):
        try:
            data = archive.read(f"{ds.CELEBA_IMAGE_FOLDER}/{name}")
            out[index] = transform_celeba_image(data, image_size, crop_size, fast_decode)
        except (ValueError, zipfile.BadZipFile, OSError) as error:  # BadZipFile: bad CRC of this entry
            errors.append((index, str(error)))
    return out, errors


# ---------------------------------------------------------------------------------------- annotations


@dataclass(frozen=True)
class CelebaAnnotations:
    """The annotations the arrays keep, row-aligned, in the order of ``list_eval_partition.txt``.

    Attributes:
        names: (N,) image file names.
        split: (N,) uint8, 0 train / 1 valid / 2 test.
        attribute_names: the 40 names from the header of ``list_attr_celeba.txt``.
        attributes: (N, 40) uint8 in {0, 1} (the file's -1 mapped to 0, as torchvision does).
        identity: (N,) int32.
    """

    names: list[str]
    split: np.ndarray
    attribute_names: list[str]
    attributes: np.ndarray
    identity: np.ndarray


def _rows(path: Path, header_lines: int) -> Iterator[tuple[int, list[str]]]:
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if number > header_lines and line.strip():
            yield number, line.split()


def read_celeba_annotations(folder: Path) -> CelebaAnnotations:
    """Parse ``list_eval_partition.txt``, ``list_attr_celeba.txt`` and ``identity_CelebA.txt`` in ``folder`` and
    align them on the image names of the partition file.

    Raises:
        DataStageError: a missing file, a malformed line (file and line number named), a count in a header that
            does not match, or an image listed in one file but not another.
    """
    paths = {name: folder / name for name in (ds.CELEBA_PARTITION, ds.CELEBA_ATTRIBUTES, ds.CELEBA_IDENTITY)}
    for path in paths.values():
        if not path.is_file():
            raise DataStageError(f"{path} is missing; {_RUN_DVC_DOWNLOAD}")

    names, codes = [], []
    for number, parts in _rows(paths[ds.CELEBA_PARTITION], 0):
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataStageError(f"{paths[ds.CELEBA_PARTITION]}:{number}: expected '<image> <0|1|2>'")
        names.append(parts[0])
        codes.append(int(parts[1]))
    row_of = {name: row for row, name in enumerate(names)}
    if len(row_of) != len(names):
        raise DataStageError(f"{paths[ds.CELEBA_PARTITION]}: an image is listed twice")

    attr_path = paths[ds.CELEBA_ATTRIBUTES]
    lines = attr_path.read_text().splitlines()
    if len(lines) < 2 or not lines[0].strip().isdigit():
        raise DataStageError(f"{attr_path}: expected the image count on line 1 and the attribute names on line 2")
    attribute_names = lines[1].split()
    if len(attribute_names) != len(ds.CELEBA_ATTRIBUTE_NAMES):
        raise DataStageError(f"{attr_path}:2: {len(attribute_names)} attribute names, expected 40")
    attributes = np.full((len(names), len(attribute_names)), 255, np.uint8)
    seen = 0
    for number, parts in _rows(attr_path, 2):
        row = row_of.get(parts[0])
        values = parts[1:]
        if row is None:
            raise DataStageError(f"{attr_path}:{number}: {parts[0]} is not in {ds.CELEBA_PARTITION}")
        if len(values) != len(attribute_names) or any(v not in ("1", "-1") for v in values):
            raise DataStageError(f"{attr_path}:{number}: expected {len(attribute_names)} values of -1 or 1")
        attributes[row] = [v == "1" for v in values]
        seen += 1
    if seen != int(lines[0]) or seen != len(names):
        raise DataStageError(f"{attr_path}: {seen} rows, header says {lines[0].strip()}, "
                             f"{ds.CELEBA_PARTITION} lists {len(names)} images")

    identity = np.full(len(names), -1, np.int64)
    for number, parts in _rows(paths[ds.CELEBA_IDENTITY], 0):
        row = row_of.get(parts[0])
        if row is None or len(parts) != 2 or not parts[1].isdigit():
            raise DataStageError(f"{paths[ds.CELEBA_IDENTITY]}:{number}: expected '<image listed in "
                                 f"{ds.CELEBA_PARTITION}> <id>'")
        identity[row] = int(parts[1])
    if (identity < 0).any():
        missing = names[int(np.argmax(identity < 0))]
        raise DataStageError(f"{paths[ds.CELEBA_IDENTITY]}: no identity for {missing}")
    return CelebaAnnotations(names, np.asarray(codes, np.uint8), attribute_names, attributes,
                             identity.astype(np.int32))


# ---------------------------------------------------------------------------------------- file helpers


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
        tmp = self.path / f".{name}.tmp"
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, self.path / name)

    def publish(self) -> None:
        from pipeline.archives import make_readable

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


def _manifest(folder: Path, dataset: str, image_shape: tuple[int, ...], attribute_names: list[str],
              counts: dict[str, int], sources: dict[str, Any], preprocess: dict[str, Any], skipped: list[str]
              ) -> dict[str, Any]:
    splits = {}
    for split in ds.SPLITS:
        files = sorted(p.name for p in folder.glob(f"{split}_*.npy"))
        splits[split] = {"count": counts[split], "files": {name: file_hexdigest(folder / name) for name in files}}
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


# ------------------------------------------------------------------------------------------------ CelebA


def _worker_count(num_workers: int) -> int:
    if num_workers > 0:
        return num_workers
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def preprocess_celeba(raw_root: Path, out_dir: Path, *, image_size: int = 64, crop_size: int = 148,
                      skip_corrupt: bool = False, fast_decode: bool = False, num_workers: int = 0
                      ) -> dict[str, Any]:
    """Decode, crop and resize every CelebA image once; write the split arrays and the manifest.

    Args:
        raw_root: ``data/raw/celeba`` (holding ``celeba/img_align_celeba.zip`` and the .txt files).
        out_dir: ``data/processed/celeba``; replaced atomically when everything is written.
        image_size: output side (64; 128 works); crop_size: the centred square cut first (148).
        skip_corrupt: leave undecodable images out (listed in the manifest) instead of failing.
        fast_decode: DCT-domain downscaled decoding (see the module docstring).
        num_workers: decode processes; 0 = all cores of this machine; 1 = in this process. More than one uses
            multiprocessing's forkserver: a script calling this must guard its top level with
            ``if __name__ == "__main__":`` (the workers import the main module, as with spawn).
    Returns:
        The manifest (also written to ``out_dir/manifest.json``).
    Raises:
        DataStageError: missing inputs (says to run the download stage), malformed annotations, an image listed
            in the partition file but absent from the zip, or a corrupt image (named) without ``skip_corrupt``.
    """
    from pipeline.archives import celeba_image_entries

    folder = raw_root / ds.CELEBA_FOLDER
    archive_path = folder / ds.CELEBA_ZIP
    if not archive_path.is_file():
        raise DataStageError(f"{archive_path} is missing; {_RUN_DVC_DOWNLOAD}")
    annotations = read_celeba_annotations(folder)
    try:
        with zipfile.ZipFile(archive_path) as archive:
            entries = celeba_image_entries(archive, str(archive_path))
    except zipfile.BadZipFile as error:
        raise DataStageError(f"{archive_path} is not a valid zip ({error}); delete it and {_RUN_DVC_DOWNLOAD}"
                             ) from None
    missing = [name for name in annotations.names if name not in entries]
    if missing:
        raise DataStageError(f"{archive_path} lacks {len(missing)} image(s) listed in {ds.CELEBA_PARTITION} "
                             f"(e.g. {', '.join(missing[:3])}); delete it and {_RUN_DVC_DOWNLOAD}")
    inputs = [archive_path] + [folder / name for name in ds.CELEBA_ANNOTATIONS if (folder / name).is_file()]
    sources = _input_checksums(inputs, raw_root / "sources.json")

    split_of = [ds.CELEBA_SPLIT_CODES[int(code)] for code in annotations.split]
    counts = {split: split_of.count(split) for split in ds.SPLITS}
    workers = _worker_count(num_workers)
    output = _OutputFolder(out_dir)
    try:
        arrays = {split: np.lib.format.open_memmap(output.path / f"{split}_images.npy", mode="w+", dtype=np.uint8,
                                                   shape=(counts[split], 3, image_size, image_size))
                  for split in ds.SPLITS}
        cursor = dict.fromkeys(ds.SPLITS, 0)
        kept_rows: dict[str, list[int]] = {split: [] for split in ds.SPLITS}
        skipped: list[str] = []
        names = annotations.names
        tasks = [(str(archive_path), names[start:start + CHUNK_IMAGES], image_size, crop_size, fast_decode)
                 for start in range(0, len(names), CHUNK_IMAGES)]
        log.info("decoding %d images from %s on %d process(es): crop %d, resize to %d%s", len(names),
                 archive_path.name, workers, crop_size, image_size, " (fast decode)" if fast_decode else "")
        pool = None
        if workers > 1 and len(tasks) > 1:
            # forkserver, not fork: the parent may run threads (progress bars, Ray, a test server) and fork()ing
            # a multi-threaded process can deadlock. Preloading this module (instead of __main__) lets each
            # worker start from a server that has numpy and Pillow imported already.
            context = multiprocessing.get_context("forkserver")
            main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
            if getattr(main_spec, "name", None) != "pipeline.preprocess":  # run as -m: __main__ *is* this module
                context.set_forkserver_preload(["pipeline.preprocess"])
            pool = context.Pool(min(workers, len(tasks)))
            results = pool.imap(_decode_chunk, tasks)
        else:
            results = map(_decode_chunk, tasks)
        try:
            with tqdm(total=len(names), desc="preprocess celeba", unit="img", disable=None) as bar:
                for task_index, (images, errors) in enumerate(results):
                    start = task_index * CHUNK_IMAGES
                    bad = dict(errors)
                    if bad and not skip_corrupt:
                        details = "; ".join(f"{names[start + i]}: {message}" for i, message in sorted(bad.items()))
                        raise DataStageError(
                            f"corrupt image(s) in {archive_path}: {details}. The download stage checked the zip's "
                            "checksum, so the archive itself holds a bad file: fetch a good copy, or set "
                            "preprocess.skip_corrupt: true to leave such images out (they are listed in the "
                            "manifest).")
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
            if pool is not None:
                pool.terminate()
                pool.join()

        for split in ds.SPLITS:
            array = arrays.pop(split)
            array.flush()
            if cursor[split] != counts[split]:  # some images skipped: rewrite at the exact length
                final = np.lib.format.open_memmap(output.path / f".{split}_images.npy.tmp", mode="w+",
                                                  dtype=np.uint8, shape=(cursor[split], 3, image_size, image_size))
                final[:] = array[:cursor[split]]
                final.flush()
                del final
                os.replace(output.path / f".{split}_images.npy.tmp", output.path / f"{split}_images.npy")
            del array
            rows = np.asarray(kept_rows[split], np.int64)
            output.save(f"{split}_attributes.npy", annotations.attributes[rows])
            output.save(f"{split}_identity.npy", annotations.identity[rows])
        manifest = _manifest(
            output.path, "celeba", (3, image_size, image_size), annotations.attribute_names, cursor, sources,
            {"crop_size": crop_size, "image_size": image_size, "fast_decode": fast_decode,
             "skip_corrupt": skip_corrupt,
             "method": "Pillow decode, center crop (torchvision CenterCrop rounding), antialiased bilinear resize "
                       "(= torchvision CenterCrop + Resize(antialias=True) on PIL images)",
             "split": f"official {ds.CELEBA_PARTITION}"},
            skipped)
        _write_manifest(output.path, manifest)
        output.publish()
    except BaseException:
        output.discard()
        raise
    log.info("wrote %s: %s", out_dir, ", ".join(f"{s} {cursor[s]}" for s in ds.SPLITS)
             + (f"; skipped {len(skipped)} corrupt image(s)" if skipped else ""))
    return manifest


# ------------------------------------------------------------------------------------------ MNIST family


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (gzipped or not) of unsigned bytes: images (N, rows, cols) or labels (N,), uint8.

    Raises:
        DataStageError: not gzip, a wrong magic number (only type 0x08, unsigned byte, is used by MNIST), or a size
            that does not match the header.
    """
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as error:
        raise DataStageError(f"{path}: not a valid gzip file ({error}); {_RUN_DVC_DOWNLOAD}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise DataStageError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()}, expected "
                             "00000801 or 00000803)")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(raw) - offset != math.prod(dims):
        raise DataStageError(f"{path}: header says {dims} = {math.prod(dims)} bytes, file has {len(raw) - offset}")
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
            raise DataStageError(f"{path} is missing; {_RUN_DVC_DOWNLOAD}")
    train_images = read_idx(paths[ds.MNIST_TRAIN_IMAGES])
    train_labels = read_idx(paths[ds.MNIST_TRAIN_LABELS])
    test_images = read_idx(paths[ds.MNIST_TEST_IMAGES])
    test_labels = read_idx(paths[ds.MNIST_TEST_LABELS])
    for images, labels, count, what in ((train_images, train_labels, 60_000, "training"),
                                        (test_images, test_labels, 10_000, "test")):
        if images.shape != (count, 28, 28) or labels.shape != (count,):
            raise DataStageError(f"{dataset} {what} set: images {images.shape} and labels {labels.shape}, expected "
                                 f"({count}, 28, 28) and ({count},)")
    cut = ds.MNIST_TRAIN_COUNT
    splits = {"train": (train_images[:cut], train_labels[:cut]), "valid": (train_images[cut:], train_labels[cut:]),
              "test": (test_images, test_labels)}
    sources = _input_checksums(list(paths.values()), raw_root / "sources.json")
    output = _OutputFolder(out_dir)
    try:
        for split, (images, labels) in splits.items():
            output.save(f"{split}_images.npy", images[:, None, :, :])
            output.save(f"{split}_labels.npy", labels)
        manifest = _manifest(output.path, dataset, ds.MNIST_IMAGE_SHAPE, [],
                             {split: len(labels) for split, (_, labels) in splits.items()}, sources,
                             {"split": "train = first 55,000 official training images, valid = last 5,000 "
                                       "official training images, test = official 10,000 test images",
                              "method": "IDX bytes unchanged, reshaped to (N, 1, 28, 28)"}, [])
        _write_manifest(output.path, manifest)
        output.publish()
    except BaseException:
        output.discard()
        raise
    log.info("wrote %s: %s", out_dir, ", ".join(f"{s} {len(splits[s][1])}" for s in ds.SPLITS))
    return manifest


def preprocess(data: DataConfig, config: PreprocessConfig) -> dict[str, Any]:
    """Run the preprocess stage for ``data.dataset``: ``data.raw_path()`` -> ``data.processed_path()``.

    Returns the manifest. Raises DataStageError (see :func:`preprocess_celeba`, :func:`preprocess_mnist_family`).
    """
    if data.dataset == "celeba":
        return preprocess_celeba(data.raw_path(), data.processed_path(), image_size=data.image_size,
                                 crop_size=config.crop_size, skip_corrupt=config.skip_corrupt,
                                 fast_decode=config.fast_decode, num_workers=config.num_workers)
    return preprocess_mnist_family(data.dataset, data.raw_path(), data.processed_path())


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.preprocess [--params PATH]``: exit status 0, or 1 with a clear message on stderr."""
    args = stage_argument_parser("pipeline.preprocess", __doc__).parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    log.setLevel(logging.INFO)

    def body() -> None:
        from pipeline.config import load_params

        params = load_params(args.params)
        preprocess(params.data, params.preprocess)

    return run_stage("preprocess", body, interrupted="nothing was written (outputs are renamed into place only "
                                                     "when complete)")


if __name__ == "__main__":
    sys.exit(main())
