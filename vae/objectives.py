"""Objectives and evaluation figures: the importance-weighted bound, the importance-sampled log-likelihood,
bits per dimension and active units.

Every function works in nats per image unless it says otherwise.
"""

from __future__ import annotations

import math

import torch

from vae.distributions import standard_normal_log_prob
from vae.model import VAE

LOG_256 = math.log(256.0)


def log_importance_weights(model: VAE, x: torch.Tensor, target: torch.Tensor, num_samples: int,
                           posterior=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for z_k ~ q(z|x), k = 1..K.

    Args:
        model: the VAE.
        x: (B, C, H, W) uint8 images (the encoder's input).
        target: (B, ...) the likelihood's target for x (fixed across the K samples).
        num_samples: K.
        posterior: q(z|x) if already computed (saves an encoder pass).
    Returns:
        (K, B) log importance weights in nats.
    """
    posterior = posterior if posterior is not None else model.encode(x)
    batch = x.shape[0]
    z = posterior.rsample(num_samples, generator)  # (K, B, D)
    params = model.decode(z.reshape(num_samples * batch, -1))
    repeated = target.repeat(num_samples, *([1] * (target.dim() - 1)))
    log_likelihood = model.likelihood.log_prob(params, repeated).view(num_samples, batch)
    return log_likelihood + standard_normal_log_prob(z) - posterior.log_prob(z)


def iwae_bound(model: VAE, x: torch.Tensor, num_samples: int, target: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """The importance-weighted bound L_K = E[log (1/K) sum_k w_k] (Burda et al. 2016, eq. 8).

    L_1 is the ELBO; L_K <= L_{K+1} <= log p(x). Differentiable (usable as a training objective).

    Args:
        x: (B, C, H, W) uint8 images; num_samples: K.
    Returns:
        (B,) the bound in nats per image (a log-likelihood: higher is better).
    """
    if target is None:
        target = model.likelihood.prepare_target(x, generator)
    log_w = log_importance_weights(model, x, target, num_samples, generator=generator)
    return torch.logsumexp(log_w, dim=0) - math.log(num_samples)


@torch.no_grad()
def importance_sampled_log_likelihood(
    model: VAE,
    x: torch.Tensor,
    num_samples: int = 1000,
    chunk_size: int = 100,
    target: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Importance-sampled estimate of log p(x) with K = ``num_samples`` samples from q(z|x) as the proposal
    (Rezende et al. 2014, appendix E; Burda et al. 2016, sec. 5): log (1/K) sum_k w_k, computed in chunks of
    ``chunk_size`` samples with a running log-sum-exp so memory stays O(chunk_size * B) for any K.

    The estimate is a stochastic lower bound on log p(x) that converges to it as K grows.

    Args:
        x: (B, C, H, W) uint8 images.
        num_samples: K (thousands for reported figures).
        chunk_size: samples of z decoded per pass for all B images at once (chunk_size * B decoder rows).
    Returns:
        (B,) log p(x) estimate in nats per image (for continuous likelihoods: a log-density of the dequantized
        data on [0,1)^D; see :func:`bits_per_dim`).
    Raises:
        ValueError: num_samples or chunk_size < 1.
    """
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples and chunk_size must be >= 1, got {num_samples} and {chunk_size}")
    if target is None:
        target = model.likelihood.prepare_target(x, generator)
    posterior = model.encode(x)
    running = torch.full((x.shape[0],), -math.inf, device=posterior.mean.device)
    done = 0
    while done < num_samples:
        k = min(chunk_size, num_samples - done)
        log_w = log_importance_weights(model, x, target, k, posterior=posterior, generator=generator).float()
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
        done += k
    return running - math.log(num_samples)


def bits_per_dim(nll_nats: torch.Tensor | float, num_dims: int, discrete: bool) -> torch.Tensor | float:
    """Negative log-likelihood per image (nats) -> bits per dimension of the 8-bit data.

    For a discrete likelihood (a probability mass over the 256 values of each subpixel, or over {0,1} for
    binarized data) this is nll / (D ln 2). For a continuous density on y = (x + u) / 256 in [0,1)^D, the
    change of scale to the 8-bit grid adds D log 256 nats: -log P(x) <= -log p(y) + D log 256 (Theis et al.
    2016, eq. 6; Papamakarios et al. 2017), which makes the figure comparable with published bits/dim.

    Args:
        nll_nats: -log p in nats per image (tensor of any shape, or a float).
        num_dims: D = C * H * W.
        discrete: the likelihood's ``discrete`` flag.
    """
    offset = 0.0 if discrete else num_dims * LOG_256
    return (nll_nats + offset) / (num_dims * math.log(2.0))


def active_units(posterior_means: torch.Tensor, threshold: float = 0.01) -> tuple[int, torch.Tensor]:
    """Active latent units (Burda et al. 2016, sec. 5.2): dimension d is active if Cov_x(E_q[z_d]) >
    threshold.

    Args:
        posterior_means: (N, D) posterior means over a data set.
    Returns:
        (number of active units, (D,) the variance of each dimension's posterior mean).
    """
    variance = posterior_means.double().var(dim=0, unbiased=True)
    return int((variance > threshold).sum()), variance.float()
