"""Frechet Inception Distance (Heusel et al. 2017) of prior samples and of reconstructions against the test
split.

The features are the 2048-d pool features of the TensorFlow Inception-v3 that the FID papers used, through
torch-fidelity (the same port torchmetrics wraps; its outputs match the reference TF implementation). The test
split's statistics are computed once and cached, keyed by the split's sha256 and the feature extractor.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.common import StageError, atomic_output, resolve, say

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
STATS_DIR = Path(".cache/fid")  # under the project root (git-ignored)

# A feature extractor: uint8 (N, 3, H, W) images -> (N, F) float features.
Extractor = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FeatureNet:
    """A feature extractor and the name that keys its cached statistics."""

    name: str
    extract: Extractor
    device: torch.device


def inception_weights_path() -> Path:
    """Where torch-fidelity looks for the Inception weights: torch hub's checkpoint folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def load_inception(device: torch.device) -> FeatureNet:
    """The Inception-v3 pool3 extractor, weights downloaded on first use into torch hub's checkpoint folder.

    Raises:
        StageError: the weights are not there and cannot be downloaded (no internet): the message names the
            file, the URL and the folder to put it in.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path()
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(path), progress=False)
        except Exception as error:  # noqa: BLE001 - any failure to fetch means the same thing to the user
            raise StageError(
                f"FID needs the Inception-v3 weights {INCEPTION_FILE} and could not download them ({error}). "
                f"Fetch {INCEPTION_URL} on a machine with internet and put it in {path.parent}/, or set "
                "evaluate.fid: auto (skips FID when the weights are missing) or false"
            ) from None
    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    net = net.to(device)
    return FeatureNet(f"inception-v3-{INCEPTION_FILE.rsplit('-', 1)[1].split('.')[0]}",
                      lambda images: net(images.to(device))[0], device)


def as_rgb_uint8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(N, C, H, W) uint8 images, or floats in [0, 1], as uint8 RGB: grey images get their channel repeated
    three times (the extractor resizes to 299x299 itself, as every FID library does).

    Raises:
        StageError: a channel count other than 1 or 3.
    """
    images = torch.from_numpy(np.array(images)) if isinstance(images, np.ndarray) else images
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255.0).round().to(torch.uint8)
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise StageError(f"FID takes (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@dataclass(frozen=True)
class Statistics:
    """Mean (F,) and covariance (F, F) of a set's features, float64, and the number of images."""

    mean: np.ndarray
    covariance: np.ndarray
    count: int


@torch.no_grad()
def feature_statistics(net: FeatureNet, batches: Iterator[torch.Tensor | np.ndarray]) -> Statistics:
    """Mean and (unbiased) covariance of the features of every image in ``batches``, accumulated in float64.

    Raises:
        StageError: fewer than 2 images.
    """
    total, outer, count = None, None, 0
    for batch in batches:
        features = net.extract(as_rgb_uint8(batch)).double().cpu()
        total = features.sum(0) if total is None else total + features.sum(0)
        outer = features.T @ features if outer is None else outer + features.T @ features
        count += features.shape[0]
    if count < 2:
        raise StageError(f"FID needs at least 2 images per set, got {count}")
    mean = total / count
    covariance = (outer - count * torch.outer(mean, mean)) / (count - 1)
    return Statistics(mean.numpy(), covariance.numpy(), count)


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (Heusel et al. 2017, eq. 6; Dowson & Landau
    1982). Tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b (real and
    non-negative for covariance matrices; numerical noise is clipped)."""
    eigenvalues = np.linalg.eigvals(a.covariance @ b.covariance)
    trace_sqrt = np.sqrt(np.clip(eigenvalues.real, 0.0, None)).sum()
    difference = a.mean - b.mean
    value = difference @ difference + np.trace(a.covariance) + np.trace(b.covariance) - 2.0 * trace_sqrt
    return float(max(value, 0.0))


def _batches(images: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for first in range(0, len(images), batch_size):
        yield np.asarray(images[first : first + batch_size])


def reference_statistics(net: FeatureNet, images: np.ndarray, data_hash: str, batch_size: int = 100
                         ) -> Statistics:
    """The test split's feature statistics, from the cache (``.cache/fid/<hash>-<extractor>.npz``) or computed
    and cached atomically.

    Args:
        images: uint8 (N, C, H, W) test images. data_hash: the split's sha256 (the manifest's).
    """
    path = resolve(STATS_DIR) / f"{data_hash[:16]}-{net.name}-{len(images)}.npz"
    if path.is_file():
        with np.load(path) as cached:
            return Statistics(cached["mean"], cached["covariance"], int(cached["count"]))
    say(f"[evaluate] FID: statistics of {len(images):,} test images with {net.name} (cached in {path})")
    stats = feature_statistics(net, _batches(images, batch_size))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp, open(tmp, "wb") as out:
        np.savez(out, mean=stats.mean, covariance=stats.covariance, count=stats.count)
    return stats


def generated_statistics(net: FeatureNet, make: Callable[[int, int], torch.Tensor], count: int,
                         batch_size: int = 100) -> Statistics:
    """Statistics of ``count`` generated images; ``make(first, n)`` returns images first .. first + n - 1."""
    return feature_statistics(net, (make(first, min(batch_size, count - first))
                                    for first in range(0, count, batch_size)))


def digest(values: dict[str, str]) -> str:
    """One sha256 of a split's file hashes (the key of its cached statistics)."""
    return hashlib.sha256("".join(f"{k}={v};" for k, v in sorted(values.items())).encode()).hexdigest()
