"""Folders of real photographs for the image-folder tests and benchmark, built offline from the colour
photographs that scikit-image (``skimage.data``) and scikit-learn (``load_sample_images``) ship in their
wheels (development dependencies), cut into many crops of varied size and aspect, saved in the formats the
pipeline reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

FORMATS = (("jpg", "JPEG"), ("png", "PNG"), ("webp", "WEBP"), ("bmp", "BMP"), ("tiff", "TIFF"))


def source_photographs() -> dict[str, np.ndarray]:
    """The shipped colour photographs as (H, W, 3) uint8 arrays, by name."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    photos = {name: getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket",
                                                         "hubble_deep_field", "retina")}
    sample = load_sample_images()
    for path, image in zip(sample.filenames, sample.images, strict=True):
        photos[Path(path).stem] = image
    return {name: np.ascontiguousarray(image[..., :3]) for name, image in photos.items()}


def photo_folder(root: Path, count: int, *, seed: int = 0, class_folders: bool = True,
                 formats: tuple[tuple[str, str], ...] = FORMATS, min_side: int = 48) -> list[str]:
    """Write ``count`` distinct crops of the photographs under ``root`` (``<photo>/<i>.<ext>`` with class
    folders, else ``<i>_<photo>.<ext>``); crops are 48-240 px on a side, of random aspect and position.

    Returns:
        The relative paths written, sorted.
    """
    rng = np.random.default_rng(seed)
    photos = source_photographs()
    names = sorted(photos)
    written = []
    for index in range(count):
        name = names[index % len(names)]
        photo = photos[name]
        height, width = photo.shape[:2]
        crop_h = int(rng.integers(min_side, min(240, height)))
        crop_w = int(rng.integers(min_side, min(240, width)))
        top = int(rng.integers(0, height - crop_h))
        left = int(rng.integers(0, width - crop_w))
        extension, kind = formats[index % len(formats)]
        relative = f"{name}/{index:05d}.{extension}" if class_folders else f"{index:05d}_{name}.{extension}"
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).save(path, kind)
        written.append(relative)
    return sorted(written)
