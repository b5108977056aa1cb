"""CelebA for the preprocess stage: the crop-and-resize of one aligned image (equal to torchvision's
``CenterCrop`` + ``Resize(antialias=True)`` to the byte), decoding chunks of the zip in worker processes, and
the annotation files (partition, attributes, identities) read and checked."""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import datasets as ds
from pipeline.datasets import DataStageError

RUN_DVC_DOWNLOAD = "run `dvc repro download` (or `python -m pipeline.download`) first"


def center_crop_box(width: int, height: int, crop_size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the centred ``crop_size`` square, rounded as torchvision's ``CenterCrop``
    rounds it (``int(round((height - crop) / 2))``; 178x218 and 148 give (15, 35, 163, 183))."""
    top = int(round((height - crop_size) / 2.0))
    left = int(round((width - crop_size) / 2.0))
    return left, top, left + crop_size, top + crop_size


def transform_celeba_image(data: bytes, image_size: int, crop_size: int = 148, fast_decode: bool = False
                           ) -> np.ndarray:
    """Decode one JPEG, center-crop it to ``crop_size`` and resize it to ``image_size`` (antialiased
    bilinear).

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
    except (
        Exception
    ) as error:  # PIL raises OSError, SyntaxError, UnidentifiedImageError, DecompressionBomb...
        raise ValueError(f"cannot decode: {error}") from None
    if scale == 1:
        image = image.crop(box).resize((image_size, image_size), Image.Resampling.BILINEAR)
    else:
        scaled_box = tuple(coordinate / scale for coordinate in box)
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=scaled_box)
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1)


_open_archives: dict[str, zipfile.ZipFile] = {}


def decode_chunk(task: tuple[str, list[str], int, int, bool]) -> tuple[np.ndarray, list[tuple[int, str]]]:
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
    """Parse ``list_eval_partition.txt``, ``list_attr_celeba.txt`` and ``identity_CelebA.txt`` in ``folder``
    and
    align them on the image names of the partition file.

    Raises:
        DataStageError: a missing file, a malformed line (file and line number named), a count in a header
            that does not match, or an image listed in one file but not another.
    """
    paths = {name: folder / name for name in (ds.CELEBA_PARTITION, ds.CELEBA_ATTRIBUTES, ds.CELEBA_IDENTITY)}
    for path in paths.values():
        if not path.is_file():
            raise DataStageError(f"{path} is missing; {RUN_DVC_DOWNLOAD}")

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
        raise DataStageError(
            f"{attr_path}: expected the image count on line 1 and the attribute names on line 2"
        )
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
        raise DataStageError(
            f"{attr_path}: {seen} rows, header says {lines[0].strip()}, "
            f"{ds.CELEBA_PARTITION} lists {len(names)} images"
        )

    identity = np.full(len(names), -1, np.int64)
    for number, parts in _rows(paths[ds.CELEBA_IDENTITY], 0):
        row = row_of.get(parts[0])
        if row is None or len(parts) != 2 or not parts[1].isdigit():
            raise DataStageError(
                f"{paths[ds.CELEBA_IDENTITY]}:{number}: expected '<image listed in "
                f"{ds.CELEBA_PARTITION}> <id>'"
            )
        identity[row] = int(parts[1])
    if (identity < 0).any():
        missing = names[int(np.argmax(identity < 0))]
        raise DataStageError(f"{paths[ds.CELEBA_IDENTITY]}: no identity for {missing}")
    return CelebaAnnotations(
        names, np.asarray(codes, np.uint8), attribute_names, attributes, identity.astype(np.int32)
    )
