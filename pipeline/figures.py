"""What a training run computes besides its steps: the validation negative ELBO and the pictures of an epoch,
in the run's arithmetic (:func:`autocast_for`)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from pipeline.data import BatchSource
from pipeline.distributed import all_reduce_sum
from vae.model import VAE
from vae.objectives import bits_per_dim


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A factory of the autocast context for ``precision``: "bf16" (or "auto" on a GPU) -> bf16 autocast on
    ``device`` (CPU autocast supports bf16 too), else no autocast (fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


@torch.no_grad()
def evaluate_elbo(model: VAE, source: BatchSource, indices: np.ndarray, batch_size: int, world_size: int,
                  autocast: Callable[[], AbstractContextManager], seed: int = 1234) -> dict[str, float]:
    """Mean negative ELBO, reconstruction and KL (nats per image) and ELBO bits/dim over this rank's
    ``indices``, summed across ranks. The likelihood's noise (dequantization / binarization) and the posterior
    samples are seeded, so epochs compare."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=source.device).manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64, device=source.device)
    for x in source.all_batches(indices, batch_size):
        target = model.likelihood.prepare_target(x, generator)
        with autocast():
            terms = model.elbo_terms(x, 1, generator=generator, target=target)
        sums += torch.stack([terms.reconstruction.double().sum(), terms.kl.double().sum(),
                             torch.tensor(float(x.shape[0]), dtype=torch.float64, device=sums.device)])
    sums = all_reduce_sum(sums, world_size)
    model.train(was_training)
    count = max(1.0, float(sums[2]))
    reconstruction, kl = float(sums[0]) / count, float(sums[1]) / count
    return {
        "negative_elbo": reconstruction + kl,
        "reconstruction": reconstruction,
        "kl": kl,
        "bits_per_dim": float(bits_per_dim(reconstruction + kl, model.num_dims, model.likelihood.discrete)),
    }


@torch.no_grad()
def epoch_images(
    model: VAE, validation: torch.Tensor, fixed_z: torch.Tensor, rows: int
) -> dict[str, np.ndarray]:
    """Pictures for the tracking UI: prior samples (fixed z), validation originals over reconstructions, and
    traversals of the latent dimensions with the largest posterior-mean variance. Float (N, C, H, W) in [0,
    1]."""
    was_training = model.training
    model.eval()
    samples = model.likelihood.mean(model.decode(fixed_z))
    originals = validation.float() / 255.0
    pairs = torch.stack([originals, model(validation)], dim=1).flatten(0, 1)
    means = model.encode(validation).mean
    top = torch.argsort(means.var(dim=0), descending=True)[: min(rows, model.latent_dim)]
    codes = means[0].repeat(top.numel(), rows, 1)
    for row, dim in enumerate(top.tolist()):
        codes[row, :, dim] = torch.linspace(-3, 3, rows, device=fixed_z.device)
    traversal = model.likelihood.mean(model.decode(codes.flatten(0, 1)))
    model.train(was_training)
    return {
        "samples": samples.cpu().numpy(),
        "reconstructions": pairs.cpu().numpy(),
        "traversals": traversal.cpu().numpy(),
    }
