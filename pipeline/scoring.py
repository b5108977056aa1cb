"""Per-image test figures: -ELBO terms and the importance-sampled log p(x), seeded per image.

Every image's random draws (the likelihood's dequantization or binarization noise, the ELBO's posterior
sample, the K importance samples) come from a generator seeded by (seed, image index), so an image's figures
do not depend on the batch it landed in, on how the K samples are chunked, or on how many workers share the
test set: :func:`score_shards` splits the images into disjoint slices, one Ray task each."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.common import StageError, format_seconds, say
from pipeline.figures import autocast_for
from vae.distributions import standard_normal_log_prob
from vae.model import VAE

MEMORY_FRACTION = {"cuda": 0.6, "cpu": 0.25}  # of the device's free memory one decoder pass may take
MAX_ROWS_PER_PASS = 1 << 16  # decoder rows (latent samples) per pass; more gains nothing on any device
WARN_AFTER_S = 3600.0


def image_generator(seed: int, index: int) -> torch.Generator:
    """The CPU generator of test image ``index``: seeded by numpy's SeedSequence of (seed, index), so nearby
    images and seeds get unrelated streams."""
    state = np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state >> np.uint64(1)))


@dataclass
class ImageScores:
    """Per-image figures of a set of test images, in the order of ``indices``.

    Attributes:
        indices: (N,) test-set indices.
        reconstruction: (N,) -E_q[log p(x|z)] with one posterior sample, nats per image.
        kl: (N,) KL(q(z|x) || p(z)) in closed form, nats per image.
        log_px: (N,) importance-sampled log p(x) (K samples), nats per image.
        squared_error: (N,) mean squared error of the deterministic reconstruction, pixels in [0, 1].
        kl_per_dim: (N, D) the KL of each latent dimension, nats.
        posterior_mean: (N, D) E_q[z] (for active units and the latent scatter).
        seconds: wall time of the computation. decodes: decoder rows evaluated (N * (K + 1)).
    """

    indices: np.ndarray
    reconstruction: np.ndarray
    kl: np.ndarray
    log_px: np.ndarray
    squared_error: np.ndarray
    kl_per_dim: np.ndarray
    posterior_mean: np.ndarray
    seconds: float = 0.0
    decodes: int = 0

    @classmethod
    def concatenate(cls, parts: list[ImageScores]) -> ImageScores:
        """One set from disjoint parts, sorted by index; ``seconds`` is the longest part's (they ran at
        once)."""
        fields = ("indices", "reconstruction", "kl", "log_px", "squared_error", "kl_per_dim",
                  "posterior_mean")
        joined = {name: np.concatenate([getattr(p, name) for p in parts]) for name in fields}
        order = np.argsort(joined["indices"], kind="stable")
        return cls(**{name: value[order] for name, value in joined.items()},
                   seconds=max((p.seconds for p in parts), default=0.0),
                   decodes=sum(p.decodes for p in parts))


def decoder_bytes_per_row(model: VAE, device: torch.device) -> int:
    """Bytes one latent sample costs in a no-grad decoder pass plus its likelihood term: the sum of every
    decoder module's output (an upper bound: most are freed as the pass goes on) plus the repeated target and
    three likelihood-sized temporaries."""
    sizes: list[int] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() * out.element_size()))
             for m in model.decoder.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            params = model.decode(torch.zeros(2, model.latent_dim, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    per_row_output = params[0].numel() * 4
    return sum(sizes) // 2 + 4 * per_row_output + 4 * model.num_dims


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of ``device``: ``torch.cuda.mem_get_info`` on a GPU, psutil's available RAM on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def samples_per_pass(model: VAE, device: torch.device, batch_size: int, num_samples: int,
                     setting: int | str) -> tuple[int, str]:
    """Importance samples decoded per image in one pass: ``setting`` when it is a number, else ("auto") as
    many as fit in ``MEMORY_FRACTION`` of the device's free memory with ``batch_size`` images per pass.

    Returns:
        (samples per pass, a sentence for the log that says how it was chosen).
    """
    if setting != "auto":
        k = min(int(setting), num_samples)
        return k, f"{k} samples per image per pass (evaluate.importance_batch_size)"
    free = free_memory_bytes(device)
    budget = int(free * MEMORY_FRACTION[device.type])
    per_row = decoder_bytes_per_row(model, device)
    rows = max(1, min(MAX_ROWS_PER_PASS, budget // per_row))
    k = max(1, min(num_samples, rows // batch_size))
    return k, (f"{k} samples per image per pass ({k * batch_size:,} decoder rows of "
               f"~{per_row / 2**20:.2f} MiB: {MEMORY_FRACTION[device.type]:.0%} of the "
               f"{free / 2**30:.1f} GiB free on {device.type})")


def _per_image_noise(model: VAE, x_cpu: torch.Tensor, indices: np.ndarray, num_samples: int, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each image's likelihood target, ELBO noise (B, D) and importance-sampling noise (B, K, D), drawn in
    that order from :func:`image_generator` (all K at once: a generator's stream does not split into equal
    chunks)."""
    targets, elbo, importance = [], [], []
    for row, index in enumerate(indices.tolist()):
        generator = image_generator(seed, index)
        targets.append(model.likelihood.prepare_target(x_cpu[row : row + 1], generator))
        elbo.append(torch.randn(model.latent_dim, generator=generator))
        importance.append(torch.randn(num_samples, model.latent_dim, generator=generator))
    return torch.cat(targets), torch.stack(elbo), torch.stack(importance)


@torch.no_grad()
def score_images(
    model: VAE,
    images: np.ndarray,
    indices: np.ndarray,
    num_samples: int,
    seed: int,
    device: torch.device,
    batch_size: int = 128,
    importance_batch_size: int | str = "auto",
    precision: str = "fp32",
    progress: Callable[[int, int], None] | None = None,
) -> ImageScores:
    """Per-image -ELBO terms and importance-sampled log p(x) (Burda et al. 2016, sec. 5) of
    ``images[indices]``.

    log p(x) ~= logsumexp_k(log p(x|z_k) + log p(z_k) - log q(z_k|x)) - log K with z_k ~ q(z|x), accumulated
    over chunks of samples with a running log-sum-exp, so memory is O(batch * chunk) for any K.

    Args:
        images: uint8 (N_all, C, H, W) test images (a memory map is fine). indices: which to score.
        num_samples: K >= 1. seed: with each image's index, seeds its draws (:func:`image_generator`).
        importance_batch_size: samples per image per decoder pass, or "auto" (:func:`samples_per_pass`).
        precision: "fp32" or "bf16" autocast of the networks (the likelihood terms are fp32 either way).
        progress: called with (images done, decoder rows done) after every batch.
    Raises:
        StageError: K < 1.
    """
    if num_samples < 1:
        raise StageError(f"evaluate.num_importance_samples must be >= 1, got {num_samples}")
    model = model.to(device).eval()
    autocast = autocast_for(precision, device)
    per_pass, _ = samples_per_pass(model, device, batch_size, num_samples, importance_batch_size)
    start = time.perf_counter()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("rec", "kl", "log_px", "mse", "kl_dim", "mean")}
    done = decodes = 0
    for first in range(0, len(indices), batch_size):
        batch_indices = np.asarray(indices[first : first + batch_size])
        x_cpu = torch.from_numpy(np.ascontiguousarray(images[np.sort(batch_indices)]))
        order = np.argsort(np.argsort(batch_indices))  # images[] needs sorted indices for memory maps
        x_cpu = x_cpu[torch.from_numpy(order)]
        target, eps_elbo, eps = (t.to(device) for t in _per_image_noise(model, x_cpu, batch_indices,
                                                                         num_samples, seed))
        x = x_cpu.to(device)
        with autocast():
            posterior = model.encode(x)
            mean, std = posterior.mean, posterior.std
            params = model.decode(mean + std * eps_elbo)
            reconstruction = -model.likelihood.log_prob(params, target)
            running = torch.full((x.shape[0],), -math.inf, device=device, dtype=torch.float64)
            for s in range(0, num_samples, per_pass):
                z = mean + std * eps[:, s : s + per_pass].transpose(0, 1)  # (k, B, D)
                k = z.shape[0]
                params = model.decode(z.reshape(k * x.shape[0], -1))
                repeated = target.repeat(k, *[1] * (target.dim() - 1))
                log_likelihood = model.likelihood.log_prob(params, repeated)
                log_w = log_likelihood.view(k, -1) + standard_normal_log_prob(z) - posterior.log_prob(z)
                running = torch.logaddexp(running, torch.logsumexp(log_w.double(), dim=0))
            mse = (model.likelihood.mean(model.decode(mean)) - x.float() / 255.0).pow(2).mean(dim=(1, 2, 3))
        parts["rec"].append(reconstruction.double().cpu())
        parts["kl_dim"].append(posterior.kl_divergence_per_dim().float().cpu())
        parts["log_px"].append((running - math.log(num_samples)).double().cpu())
        parts["mse"].append(mse.double().cpu())
        parts["mean"].append(mean.float().cpu())
        done += x.shape[0]
        decodes += x.shape[0] * (num_samples + 2)
        if progress is not None:
            progress(done, decodes)
    kl_per_dim = torch.cat(parts["kl_dim"]) if parts["kl_dim"] else torch.zeros(0, model.latent_dim)
    return ImageScores(
        indices=np.asarray(indices, dtype=np.int64),
        reconstruction=torch.cat(parts["rec"]).numpy() if done else np.zeros(0),
        kl=kl_per_dim.double().sum(dim=1).numpy(),
        log_px=torch.cat(parts["log_px"]).numpy() if done else np.zeros(0),
        squared_error=torch.cat(parts["mse"]).numpy() if done else np.zeros(0),
        kl_per_dim=kl_per_dim.numpy(),
        posterior_mean=torch.cat(parts["mean"]).numpy() if done else np.zeros((0, model.latent_dim)),
        seconds=time.perf_counter() - start,
        decodes=decodes,
    )


class CostReport:
    """The progress callback of one shard: a tqdm bar (images, images/s, ETA; decodes/s in its description),
    the projected total after the first batch, and a warning with the settings to change when it is over an
    hour. ``bar_class``: tqdm's (default) or Ray's ``tqdm_ray`` inside a Ray task (drawn by the driver)."""

    def __init__(self, total: int, label: str, num_workers: int, num_samples: int, bar_class=None):
        from tqdm import tqdm

        self.prefix = f"[evaluate] NLL{f' ({label})' if label else ''}"
        if bar_class is None:  # in a log file (not a terminal) one line every 30 s
            interval = 1 if sys.stderr.isatty() else 30
            self.bar = tqdm(total=total, desc=self.prefix, unit="img", mininterval=interval)
        else:
            self.bar = bar_class(total=total, desc=self.prefix, unit="img")
        self.total, self.num_workers, self.num_samples = total, num_workers, num_samples
        self.started = time.perf_counter()
        self.projected = False

    def __call__(self, done: int, decodes: int) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.update(done - self.bar.n)
        self.bar.set_description(f"{self.prefix} {decodes / elapsed:,.0f} decodes/s")
        if not self.projected and done < self.total:
            self.projected = True
            projected = elapsed / done * self.total
            say(f"{self.prefix}: projected {format_seconds(projected)} for {self.total:,} "
                f"images at K={self.num_samples} ({done / elapsed:.1f} images/s)")
            if projected > WARN_AFTER_S:
                say(f"[evaluate] warning: the NLL will take about {format_seconds(projected)}; lower "
                    "evaluate.num_importance_samples or set evaluate.max_images, or raise "
                    f"evaluate.num_workers (now {self.num_workers}) on a cluster with more CPUs or GPUs")

    def close(self) -> None:
        self.bar.close()


def _score_shard(model_config: dict[str, Any], weights: dict[str, torch.Tensor], images: np.ndarray,
                 indices: np.ndarray, settings: dict[str, Any], label: str, in_ray: bool) -> ImageScores:
    """One worker's share (runs here or as a Ray task)."""
    from pipeline.distributed import pick_device

    model = VAE.from_config(model_config)
    model.load_state_dict(weights)
    device = pick_device("auto")
    bar_class = None
    if in_ray:
        from ray.experimental.tqdm_ray import tqdm as bar_class
    per_pass, how = samples_per_pass(model.to(device), device, settings["batch_size"],
                                     settings["num_samples"], settings["importance_batch_size"])
    say(f"[evaluate] NLL{f' ({label})' if label else ''} on {device}: {how}")
    report = CostReport(len(indices), label, settings["num_workers"], settings["num_samples"], bar_class)
    try:
        return score_images(model, images, indices, settings["num_samples"], settings["seed"], device,
                            settings["batch_size"], per_pass, settings["precision"], report)
    finally:
        report.close()


def score_shards(model: VAE, images: np.ndarray, settings: dict[str, Any], use_ray: bool) -> ImageScores:
    """Score every image of ``images``, split into ``settings["num_workers"]`` disjoint contiguous slices.

    With ``use_ray`` each slice is a Ray task (one GPU each when the cluster has as many, else one CPU each)
    on the connected cluster; otherwise the one slice runs in this process.

    Args:
        settings: num_workers, num_samples, seed, batch_size, importance_batch_size, precision.
    Raises:
        StageError: more workers than the cluster has GPUs or CPUs for, or than there are images.
    """
    workers = int(settings["num_workers"])
    if workers > len(images):
        raise StageError(f"evaluate.num_workers={workers} is more than the {len(images)} test images")
    slices = np.array_split(np.arange(len(images)), workers)
    config, weights = model.config, {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if not use_ray:
        return _score_shard(config, weights, images, slices[0], settings, "", in_ray=False)
    import ray

    resources = ray.cluster_resources()
    gpus = 1 if resources.get("GPU", 0) >= workers else 0
    if not gpus and resources.get("CPU", 0) < workers:
        raise StageError(
            f"evaluate.num_workers={workers} but the Ray cluster has {resources.get('CPU', 0):.0f} CPUs and "
            f"{resources.get('GPU', 0):.0f} GPUs: lower evaluate.num_workers or add nodes")
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_score_shard)
    images_ref, weights_ref = ray.put(np.asarray(images)), ray.put(weights)
    futures = [task.remote(config, weights_ref, images_ref, part, settings, f"worker {w + 1}/{workers}", True)
               for w, part in enumerate(slices)]
    return ImageScores.concatenate(ray.get(futures))
