"""A folder of the user's own images as a dataset (``data.dataset: image_folder``): listing, the decode of one
image (EXIF orientation, every mode to RGB or grey, centre crop, antialiased resize: equal to torchvision's
transforms to the byte), splits from a hash of each image's relative path, exact duplicates, class folders and
a CSV of per-image attributes; and :func:`preprocess_image_folder`, which the preprocess stage runs to turn
them into the same arrays and manifest as CelebA's.

Split rule (stable under additions): an image's split is decided by ``u = int(sha256(relative path)[:8]) /
2**64`` alone: ``train`` when ``u < f_train``, ``valid`` when ``u < f_train + f_valid``, otherwise ``test``.
Adding, changing or removing other images never moves an image to another split.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from pipeline import datasets as ds
from pipeline.celeba import center_crop_box
from pipeline.datasets import DataStageError
from pipeline.processed_folder import (
    _manifest,
    _OutputFolder,
    _write_manifest,
    map_in_processes,
    worker_count,
)

log = logging.getLogger("pipeline.preprocess")

# What torchvision's ImageFolder reads too (its IMG_EXTENSIONS less .pgm/.ppm/.gif, which hold no
# photographs), compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class FolderListing:
    """The files under an image folder, in sorted order of their relative (POSIX) paths.

    Attributes:
        root: the folder (absolute).
        images: relative paths of the files with an image extension.
        other_files: relative paths of every other file (counted and listed, not read).
    """

    root: Path
    images: list[str] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)


def list_image_folder(root: Path) -> FolderListing:
    """Every file under ``root``, recursively, split into images (by extension) and other files.

    A symbolic link is followed only when it leads to a place inside ``root``; a linked folder inside ``root``
    is not descended into (its files are listed under their own path already).

    Raises:
        DataStageError: ``root`` is not a folder, or a symbolic link leads outside it (named, with the way
            out: copy the file in, or remove the link).
    """
    root = Path(root).absolute()
    if not root.is_dir():
        raise DataStageError(
            f"data.image_folder {root} is not a folder; set data.image_folder in params.yaml to the folder "
            "(or s3://bucket/prefix) holding your images"
        )
    real_root = root.resolve()
    listing = FolderListing(root)
    for folder, subfolders, files in os.walk(root):
        here = Path(folder)
        for name in list(subfolders):
            if (here / name).is_symlink():
                _check_link(here / name, real_root, root)
                subfolders.remove(name)
        for name in files:
            path = here / name
            if path.is_symlink():
                _check_link(path, real_root, root)
            relative = path.relative_to(root).as_posix()
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                listing.images.append(relative)
            else:
                listing.other_files.append(relative)
    listing.images.sort()
    listing.other_files.sort()
    return listing


def _check_link(link: Path, real_root: Path, root: Path) -> None:
    target = link.resolve()
    if not target.is_relative_to(real_root):
        raise DataStageError(
            f"{link} is a symbolic link to {target}, outside data.image_folder {root}: the dataset would "
            "depend on a file DVC does not track. Copy the file into the folder, or remove the link"
        )


def split_of(relative_path: str, fractions: dict[str, float]) -> str:
    """The split of one image from the sha256 of its relative path (see the module docstring).

    Args:
        relative_path: POSIX path relative to the image folder, e.g. ``"cats/0001.jpg"``.
        fractions: {"train": f, "valid": f, "test": f}, summing to 1.
    """
    draw = int.from_bytes(hashlib.sha256(relative_path.encode()).digest()[:8], "big") / 2**64
    if draw < fractions["train"]:
        return "train"
    if draw < fractions["train"] + fractions["valid"]:
        return "valid"
    return "test"


def to_eight_bit(image: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grey image as 8-bit ``L``: the high byte of each 16-bit value (values are
    clipped to 0..65535 first). Pillow's own ``convert("L")`` clips at 255 instead, which turns most 16-bit
    photographs white."""
    values = np.asarray(image).astype(np.int64)
    return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")


def transform_image(data: bytes, image_size: int, channels: int = 3, crop: str = "center",
                    conversions: Counter | None = None) -> np.ndarray:
    """Decode one image file and make it a square ``image_size`` array.

    Steps: decode (Pillow); apply the EXIF orientation (``ImageOps.exif_transpose``); convert the mode to RGB
    (``channels == 3``) or L (``channels == 1``) with Pillow's ``convert``, as torchvision's ``pil_loader``
    does (alpha dropped; 16-bit grey through :func:`to_eight_bit` first); with ``crop == "center"`` cut the
    centred square of the shorter side (rounded as torchvision's ``CenterCrop``); resize to ``image_size``
    (bilinear, antialiased). The result equals ``Resize(image_size)(CenterCrop(min(w, h))(img))`` (or
    ``Resize((s, s))`` for ``crop == "none"``) of torchvision on the converted image, to the byte (tested).

    Args:
        data: the file's bytes.
        image_size: output side in pixels.
        channels: 3 (RGB) or 1 (grey).
        crop: "center" or "none" (the whole image squeezed to a square).
        conversions: counts "<mode>-><mode>" for each conversion made (for the log and the manifest).
    Returns:
        uint8 array (channels, image_size, image_size).
    Raises:
        ValueError: not a decodable image (corrupt, truncated, an unknown format), or larger than Pillow's
            pixel limit (``Image.MAX_IMAGE_PIXELS``, a decompression bomb).
    """
    target = "RGB" if channels == 3 else "L"
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and raises only above twice that; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()  # decodes; fails on truncated or corrupt data
        image = ImageOps.exif_transpose(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"refused as a decompression bomb: {error}") from None
    except Exception as error:  # Pillow raises OSError, SyntaxError, UnidentifiedImageError, struct.error...
        raise ValueError(f"cannot decode: {error}") from None
    if image.mode != target:
        source = image.mode
        if source in SIXTEEN_BIT_MODES:
            image = to_eight_bit(image)
        image = image.convert(target)
        if conversions is not None:
            conversions[f"{source}->{target}"] += 1
    width, height = image.size
    if crop == "center":
        side = min(width, height)
        image = image.crop(center_crop_box(width, height, side))
    image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def decode_files(task: tuple[str, list[str], int, int, str]
                 ) -> tuple[np.ndarray, list[tuple[str, int]], list[tuple[int, str]], Counter]:
    """Worker: read, hash and decode some files of a folder.

    Args:
        task: (root, relative paths, image_size, channels, crop).
    Returns:
        (images (n, C, S, S) uint8, [(sha256 hex, size in bytes)] per file, [(index, error)], conversions).
    """
    root, names, image_size, channels, crop = task
    images = np.zeros((len(names), channels, image_size, image_size), np.uint8)
    digests: list[tuple[str, int]] = []
    errors: list[tuple[int, str]] = []
    conversions: Counter = Counter()
    for index, name in enumerate(names):
        try:
            data = (Path(root) / name).read_bytes()
        except OSError as error:
            digests.append(("", 0))
            errors.append((index, f"cannot read: {error.strerror or error}"))
            continue
        digests.append((hashlib.sha256(data).hexdigest(), len(data)))
        try:
            images[index] = transform_image(data, image_size, channels, crop, conversions)
        except ValueError as error:
            errors.append((index, str(error)))
    return images, digests, errors, conversions


def class_labels(names: list[str], root: Path) -> tuple[list[str], np.ndarray]:
    """torchvision ``ImageFolder`` labels: the classes are the sorted names of the first-level folders, each
    image's label the index of the folder it is in.

    Returns:
        (class names, (N,) int64 labels aligned with ``names``).
    Raises:
        DataStageError: an image directly in ``root`` (not in a class folder).
    """
    loose = [name for name in names if "/" not in name]
    if loose:
        raise DataStageError(
            f"data.class_folders is on but {len(loose)} image(s) lie directly in {root} (e.g. "
            f"{', '.join(loose[:3])}): put each image in a folder named after its class, or set "
            "data.class_folders: false"
        )
    classes = sorted({name.split("/", 1)[0] for name in names})
    index = {name: i for i, name in enumerate(classes)}
    return classes, np.asarray([index[name.split("/", 1)[0]] for name in names], np.int64)


def read_attributes_csv(path: Path, names: list[str]) -> tuple[list[str], np.ndarray]:
    """Per-image attributes from a CSV: a header ``path,<attribute>,...`` and one row per image, the path
    relative to the image folder, values 1 or 0 (-1 is read as 0, as CelebA's files write it).

    Returns:
        (attribute names, (N, A) uint8 in {0, 1} aligned with ``names``).
    Raises:
        DataStageError: a missing or malformed file, a row whose image is not in the folder, an image without
            a row, a path listed twice (each names the file and line or image).
    """
    if not path.is_file():
        raise DataStageError(f"data.attributes_csv {path} does not exist; fix the path or set it to null")
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or len(rows[0]) < 2 or rows[0][0].strip() != "path":
        raise DataStageError(f"{path}:1: expected the header 'path,<attribute>,...'")
    attribute_names = [name.strip() for name in rows[0][1:]]
    wanted = {name: row for row, name in enumerate(names)}
    values = np.full((len(names), len(attribute_names)), 255, np.uint8)
    seen: set[str] = set()
    for number, row in enumerate(rows[1:], 2):
        if not row or not "".join(row).strip():
            continue
        name = row[0].strip()
        if len(row) != len(attribute_names) + 1 or any(v.strip() not in ("1", "0", "-1") for v in row[1:]):
            raise DataStageError(f"{path}:{number}: expected a path and {len(attribute_names)} values of 1, "
                                 "0 or -1")
        if name in seen:
            raise DataStageError(f"{path}:{number}: {name} is listed twice")
        seen.add(name)
        if name not in wanted:
            raise DataStageError(f"{path}:{number}: {name} is not an image of the folder (or it was left out "
                                 "as corrupt or a duplicate); remove the row or add the image")
        values[wanted[name]] = [v.strip() == "1" for v in row[1:]]
    missing = [name for name in names if name not in seen]
    if missing:
        raise DataStageError(f"{path} has no row for {len(missing)} image(s) of the folder (e.g. "
                             f"{', '.join(missing[:3])}); add a row for each image")
    return attribute_names, values


def check_split_counts(counts: dict[str, int], fractions: dict[str, float], root: Path) -> None:
    """Refuse splits that cannot train or evaluate: an empty split.

    Raises:
        DataStageError: names the split, the counts and the fractions, and the way out.
    """
    empty = [split for split in ds.SPLITS if counts[split] == 0]
    if empty:
        raise DataStageError(
            f"{root}: {sum(counts.values())} usable image(s) give "
            + ", ".join(f"{s} {counts[s]}" for s in ds.SPLITS)
            + f" with data.split_fractions {fractions}: the {' and '.join(empty)} split(s) would be empty. "
            "Add images (a few hundred at least) or change data.split_fractions"
        )


CHUNK_FILES = 128  # files per task sent to a decode process


def preprocess_image_folder(
    root: Path,
    out_dir: Path,
    *,
    image_size: int = 64,
    channels: int = 3,
    crop: str = "center",
    split_fractions: dict[str, float] | None = None,
    class_folders: bool = False,
    attributes_csv: Path | None = None,
    skip_corrupt: bool = False,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Decode every image of a folder once; write the split arrays and the manifest as for CelebA.

    Writes ``{split}_images.npy`` (N, channels, image_size, image_size) uint8, ``{split}_labels.npy`` (N,)
    int64 with ``class_folders``, ``{split}_attributes.npy`` (N, A) uint8 with ``attributes_csv``, and
    ``manifest.json``: every source image's size and sha256, the files that are not images, the exact
    duplicates (the first path in sorted order is kept, the others left out, so no content is in two splits),
    the mode conversions made, the split rule and every array's sha256. ``out_dir`` is replaced atomically.

    Args:
        root: the image folder (recursive). Rows follow the sorted relative paths within each split.
        split_fractions: {"train", "valid", "test"} fractions (summing to 1); default 0.8 / 0.1 / 0.1.
        num_workers: decode processes; 0 = all cores; 1 = in this process (see
            :func:`pipeline.processed_folder.map_in_processes` for scripts).
    Returns:
        The manifest.
    Raises:
        DataStageError: see :func:`list_image_folder`, :func:`class_labels`, :func:`read_attributes_csv`,
            :func:`check_split_counts`; no image in the folder; a corrupt, truncated or oversized image
            (every one named) without ``skip_corrupt``.
    """
    fractions = split_fractions or {"train": 0.8, "valid": 0.1, "test": 0.1}
    listing = list_image_folder(root)
    names = listing.images
    if listing.other_files:
        log.warning("%d file(s) in %s are not images (by extension) and are left out: %s%s",
                    len(listing.other_files), root, ", ".join(listing.other_files[:10]),
                    " ..." if len(listing.other_files) > 10 else "")
    if not names:
        raise DataStageError(
            f"no images in {listing.root} (looked for {', '.join(IMAGE_EXTENSIONS)} in every subfolder; "
            "found "
            f"{len(listing.other_files)} other file(s)); point data.image_folder at a folder of images"
        )
    attribute_names: list[str] = []
    attributes = None
    if attributes_csv is not None:
        if not Path(attributes_csv).absolute().is_relative_to(listing.root):
            raise DataStageError(
                f"data.attributes_csv {attributes_csv} is outside data.image_folder {listing.root}: move it "
                "into the folder (DVC then re-runs preprocess when it changes) and set data.attributes_csv "
                "to its path"
            )
        attribute_names, attributes = read_attributes_csv(Path(attributes_csv), names)
    workers = worker_count(num_workers)
    shape = (channels, image_size, image_size)
    output = _OutputFolder(out_dir)
    try:
        scratch_path = output.path / "all_images.scratch"
        everything = np.lib.format.open_memmap(scratch_path, mode="w+", dtype=np.uint8,
                                               shape=(len(names), *shape))
        digests: list[tuple[str, int]] = []
        errors: dict[int, str] = {}
        conversions: Counter = Counter()
        tasks = [(str(listing.root), names[start : start + CHUNK_FILES], image_size, channels, crop)
                 for start in range(0, len(names), CHUNK_FILES)]
        log.info("decoding %d images from %s on %d process(es): %s crop, resize to %d, %d channel(s)",
                 len(names), listing.root, workers, crop, image_size, channels)
        results = map_in_processes(decode_files, tasks, workers)
        try:
            with tqdm(total=len(names), desc="preprocess images", unit="img", disable=None) as bar:
                for task_index, (images, chunk_digests, chunk_errors, found) in enumerate(results):
                    start = task_index * CHUNK_FILES
                    everything[start : start + len(images)] = images
                    digests.extend(chunk_digests)
                    errors.update((start + index, message) for index, message in chunk_errors)
                    conversions.update(found)
                    bar.update(len(images))
        finally:
            results.close()
        if errors and not skip_corrupt:
            details = "; ".join(f"{names[row]}: {message}" for row, message in sorted(errors.items())[:10])
            raise DataStageError(
                f"{len(errors)} image(s) in {listing.root} cannot be used: {details}"
                f"{' ...' if len(errors) > 10 else ''}. Replace or remove them, or set "
                "preprocess.skip_corrupt: true to leave them out (they are listed in the manifest)"
            )
        for row, message in sorted(errors.items()):
            log.warning("skipping %s: %s", names[row], message)
        if conversions:
            log.info("converted: %s", ", ".join(f"{key} {n}" for key, n in sorted(conversions.items())))
        first_with: dict[str, int] = {}
        duplicates: dict[str, list[str]] = {}
        rows_of = {split: [] for split in ds.SPLITS}
        for row, name in enumerate(names):
            if row in errors:
                continue
            digest = digests[row][0]
            if digest in first_with:
                duplicates.setdefault(names[first_with[digest]], []).append(name)
                continue
            first_with[digest] = row
            rows_of[split_of(name, fractions)].append(row)
        if duplicates:
            log.warning("%d exact duplicate(s) left out (each content kept once, under its first path): %s",
                        sum(map(len, duplicates.values())),
                        "; ".join(f"{kept} = {', '.join(copies)}"
                                  for kept, copies in list(duplicates.items())[:5]))
        counts = {split: len(rows) for split, rows in rows_of.items()}
        check_split_counts(counts, fractions, listing.root)
        labels = class_labels(names, listing.root) if class_folders else None
        for split, rows in rows_of.items():
            index = np.asarray(rows, np.int64)
            array = np.lib.format.open_memmap(output.path / f"{split}_images.npy", mode="w+", dtype=np.uint8,
                                              shape=(len(rows), *shape))
            for start in range(0, len(rows), 4096):  # bounded memory: a block of rows at a time
                array[start : start + 4096] = everything[index[start : start + 4096]]
            array.flush()
            del array
            if labels is not None:
                output.save(f"{split}_labels.npy", labels[1][index])
            if attributes is not None:
                output.save(f"{split}_attributes.npy", attributes[index])
        del everything
        scratch_path.unlink()
        # Every file: its size, sha256 and where it went (split, row), or why it is not in the arrays.
        sources: dict[str, dict[str, Any]] = {
            name: {"size": size, "sha256": digest}
            for name, (digest, size) in zip(names, digests, strict=True)
        }
        for split, rows in rows_of.items():
            for position, row in enumerate(rows):
                sources[names[row]].update(split=split, row=position)
        for kept, copies in duplicates.items():
            for name in copies:
                sources[name]["duplicate_of"] = kept
        for row, message in errors.items():
            sources[names[row]]["skipped"] = message
        manifest = _manifest(
            output.path, "image_folder", shape, attribute_names, counts, sources,
            {
                "image_folder": str(listing.root),
                "image_size": image_size,
                "channels": channels,
                "crop": crop,
                "skip_corrupt": skip_corrupt,
                "method": "Pillow decode, EXIF orientation, mode -> " + ("RGB" if channels == 3 else "L")
                + (", centre square of the shorter side (torchvision CenterCrop rounding)" if crop == "center"
                   else "") + ", antialiased bilinear resize (= torchvision "
                + ("CenterCrop + Resize(antialias=True)" if crop == "center" else "Resize((s, s))")
                + " on PIL images)",
                "split": "sha256 of the relative path, first 8 bytes / 2**64 = u: train if u < "
                f"{fractions['train']}, valid if u < {fractions['train'] + fractions['valid']}, else test",
                "split_fractions": fractions,
                "conversions": dict(sorted(conversions.items())),
            },
            [names[row] for row in sorted(errors)],
        )
        manifest.update(
            other_files=listing.other_files,
            duplicates=duplicates,
        )
        if labels is not None:
            manifest["class_names"] = labels[0]
        _write_manifest(output.path, manifest)
        output.publish()
    except BaseException:
        output.discard()
        raise
    log.info("wrote %s: %s", out_dir, ", ".join(f"{s} {counts[s]}" for s in ds.SPLITS))
    return manifest
