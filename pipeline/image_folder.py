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
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from pipeline import datasets as ds
from pipeline import storage_access
from pipeline.celeba import center_crop_box
from pipeline.datasets import DataStageError

# What torchvision's ImageFolder reads too (its IMG_EXTENSIONS less .pgm/.ppm/.gif, which hold no
# photographs), compared in lower case.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass
class FolderListing:
    """The files under an image folder, in sorted order of their relative (POSIX) paths.

    Attributes:
        root: the folder (an absolute path) or ``s3://bucket/prefix``.
        images: relative paths of the files with an image extension.
        other_files: relative paths of every other file (counted and listed, not read).
    """

    root: str
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
    listing = FolderListing(str(root))
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


def list_images(location: str, endpoint: str | None = None) -> FolderListing:
    """:func:`list_image_folder` for a local folder; for ``s3://bucket/prefix`` every object under the prefix
    (recursively, through :func:`pipeline.storage_access.filesystem`).

    Raises:
        DataStageError: see :func:`list_image_folder`; an s3 prefix that holds no object.
        pipeline.storage_access.StorageError: the store does not answer, refuses the credentials, or has no
            such bucket (the message names the setting to fix).
    """
    if not storage_access.is_uri(location):
        return list_image_folder(Path(location))
    import pyarrow.fs as pafs

    storage_access.check_location(location, endpoint, "data.image_folder")
    filesystem, base = storage_access.filesystem(location, endpoint, patient=False)
    base = base.rstrip("/")
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as error:
        raise storage_access.StorageError(f"data.image_folder {location}: cannot list it ({error})") from None
    listing = FolderListing(location.rstrip("/"))
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        relative = info.path[len(base) + 1 :]
        kind = listing.images if Path(relative).suffix.lower() in IMAGE_EXTENSIONS else listing.other_files
        kind.append(relative)
    if not infos:
        raise DataStageError(
            f"data.image_folder {location} holds no objects: upload your images under that prefix, or fix "
            "the URI (bucket and prefix)"
        )
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


_filesystems: dict[tuple[str, str | None], Any] = {}


def read_source(location: str, name: str, endpoint: str | None = None) -> bytes:
    """The bytes of image ``name`` (relative path) under ``location``: a local folder or ``s3://bucket/prefix``
    (through :func:`pipeline.storage_access.filesystem`, the endpoint settings of every other stage).

    Raises:
        OSError: the file cannot be read (missing, no permission, the store refused).
    """
    if not storage_access.is_uri(location):
        return (Path(location) / name).read_bytes()
    key = (location, endpoint)
    if key not in _filesystems:  # one client per process and store
        _filesystems[key] = storage_access.filesystem(location, endpoint)
    filesystem, base = _filesystems[key]
    with filesystem.open_input_stream(f"{base.rstrip('/')}/{name}") as stream:
        return stream.readall()


def decode_files(location: str, names: list[str], image_size: int, channels: int, crop: str,
                 endpoint: str | None = None) -> dict[str, np.ndarray]:
    """Read, hash and decode some images: what each decode process or Ray Data task runs.

    Args:
        location: the image folder or ``s3://`` prefix; names: relative paths under it.
    Returns:
        Columns aligned with ``names`` (a Ray Data batch): ``name``; ``image`` (n, C, S, S) uint8 (zeros for a
        file that failed); ``sha256`` (hex, "" when unreadable); ``size`` (bytes); ``error`` ("" or why the
        file cannot be used); ``conversion`` ("" or e.g. "CMYK->RGB").
    """
    count = len(names)
    columns: dict[str, Any] = {
        "name": np.asarray(names, dtype=object),
        "image": np.zeros((count, channels, image_size, image_size), np.uint8),
        "sha256": np.full(count, "", dtype=object),
        "size": np.zeros(count, np.int64),
        "error": np.full(count, "", dtype=object),
        "conversion": np.full(count, "", dtype=object),
    }
    for index, name in enumerate(names):
        try:
            data = read_source(location, name, endpoint)
        except OSError as error:
            columns["error"][index] = f"cannot read: {error.strerror or error}"
            continue
        columns["sha256"][index] = hashlib.sha256(data).hexdigest()
        columns["size"][index] = len(data)
        conversions: Counter = Counter()
        try:
            columns["image"][index] = transform_image(data, image_size, channels, crop, conversions)
        except ValueError as error:
            columns["error"][index] = str(error)
        columns["conversion"][index] = next(iter(conversions), "")
    return columns


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


def read_attributes_csv(location: str, csv_name: str, names: list[str], endpoint: str | None = None
                        ) -> tuple[list[str], np.ndarray]:
    """Per-image attributes from a CSV kept in the image folder: a header ``path,<attribute>,...`` and one row
    per image, the path relative to the folder, values 1 or 0 (-1 is read as 0, as CelebA's files write it).

    Args:
        location: the image folder or ``s3://`` prefix; csv_name: the CSV's path relative to it.
        names: the images' relative paths.
    Returns:
        (attribute names, (N, A) uint8 in {0, 1} aligned with ``names``).
    Raises:
        DataStageError: a CSV outside the folder, missing or malformed, a row whose image is not in the
            folder, an image without a row, a path listed twice (each names the file and line or image).
    """
    if Path(csv_name).is_absolute() or ".." in Path(csv_name).parts:
        raise DataStageError(
            f"data.attributes_csv {csv_name} must be a path inside data.image_folder, relative to it (e.g. "
            "attributes.csv): DVC then re-runs preprocess when it changes. Move the file into the folder"
        )
    path = f"{location}/{csv_name}"
    try:
        text = read_source(location, csv_name, endpoint).decode("utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataStageError(f"data.attributes_csv {path}: cannot read it ({error}); fix the path or set "
                             "it to null") from None
    rows = list(csv.reader(io.StringIO(text, newline="")))
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

