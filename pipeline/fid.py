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
# The weights' sha256, checked on download and before every load (torch-fidelity loads them with
# torch.load(weights_only=False), which runs whatever code a crafted file carries). Only the first 8 hex
# digits are known: the ones torch hub's naming convention puts in the file name (...-6726825d.pth); the
# file was not at hand to compute the full digest. Replace it by the full 64-digit digest of a copy fetched
# from INCEPTION_URL when one is: 8 digits stop a damaged or substituted file, not one crafted to match them.
INCEPTION_SHA256 = "6726825d"
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


def verify_inception_weights(path: Path) -> None:
    """Check the Inception weights file ``path`` against :data:`INCEPTION_SHA256` before it is loaded: a
    damaged or substituted file is never unpickled.

    Raises:
        StageError: its sha256 differs; the message names the file, both digests and says to delete it (the
            next run downloads it again).
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 1024 * 1024):
            digest.update(chunk)
    if not digest.hexdigest().startswith(INCEPTION_SHA256):
        raise StageError(
            f"FID: the Inception-v3 weights {path} have sha256 {digest.hexdigest()[:16]}..., not "
            f"{INCEPTION_SHA256}... ({INCEPTION_FILE}): the file is damaged or not the genuine weights, and "
            f"was not loaded. Delete it (the next run downloads it again from {INCEPTION_URL}) or put the "
            "genuine file there"
        )


def load_inception(device: torch.device) -> FeatureNet:
    """The Inception-v3 pool3 extractor, weights downloaded on first use into torch hub's checkpoint folder.
    The weights' sha256 is checked on download (a wrong file is removed, never kept in the folder) and again
    before each load (:func:`verify_inception_weights`).

    Raises:
        StageError: the weights are not there and cannot be downloaded (no internet): the message names the
            file, the URL and the folder to put it in; or the download or the file in the folder has the wrong
            sha256 (the message says so, and for a file in the folder, to delete it).
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = inception_weights_path()
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(INCEPTION_URL, str(path), hash_prefix=INCEPTION_SHA256,
                                           progress=False)
        except RuntimeError as error:
            if "invalid hash value" not in str(error):
                raise StageError(_no_weights(path, error)) from None
            raise StageError(
                f"FID: the Inception-v3 weights downloaded from {INCEPTION_URL} are not the genuine file "
                f"({error}); they were discarded, nothing was kept in {path.parent}/. The URL or a proxy "
                f"serves another file: fetch {INCEPTION_FILE} from its release page and put it in "
                f"{path.parent}/, or set evaluate.fid: auto (skips FID) or false"
            ) from None
        except Exception as error:  # noqa: BLE001 - any failure to fetch means the same thing to the user
            raise StageError(_no_weights(path, error)) from None
    verify_inception_weights(path)
    net = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
    )
    net = net.to(device)
    return FeatureNet(f"inception-v3-{INCEPTION_FILE.rsplit('-', 1)[1].split('.')[0]}",
                      lambda images: net(images.to(device))[0], device)


def _no_weights(path: Path, error: Exception) -> str:
    return (f"FID needs the Inception-v3 weights {INCEPTION_FILE} and could not download them ({error}). "
            f"Fetch {INCEPTION_URL} on a machine with internet and put it in {path.parent}/, or set "
            "evaluate.fid: auto (skips FID when the weights are missing) or false")


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
