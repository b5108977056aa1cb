"""The approximate posterior q(z|x) (a diagonal Gaussian) and the standard normal prior p(z)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LOG_2PI = math.log(2.0 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I) summed over the last (latent) dimension.

    Args:
        z: (..., D) latent codes.
    Returns:
        (...) log-density in nats.
    """
    return -0.5 * (z.pow(2) + LOG_2PI).sum(dim=-1)


@dataclass
class DiagonalGaussian:
    """q(z|x) = N(z; mean, diag(exp(log_variance))), as output by a Gaussian encoder (Kingma & Welling 2014).

    Attributes:
        mean: (B, D) posterior means.
        log_variance: (B, D) posterior log-variances (log sigma^2).
    """

    mean: torch.Tensor
    log_variance: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        """(B, D) posterior standard deviations sigma = exp(log_variance / 2)."""
        return torch.exp(0.5 * self.log_variance)

    def rsample(self, num_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterized samples z = mean + sigma * eps, eps ~ N(0, I) (Kingma & Welling 2014, sec. 2.4).

        Gradients flow to ``mean`` and ``log_variance`` through z.

        Args:
            num_samples: L, samples per data point.
            generator: optional torch.Generator for reproducible noise.
        Returns:
            (L, B, D) latent samples.
        """
        shape = (num_samples, *self.mean.shape)
        eps = torch.randn(shape, dtype=self.mean.dtype, device=self.mean.device, generator=generator)
        return self.mean + self.std * eps

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log q(z|x) summed over latent dimensions.

        Args:
            z: (..., B, D) latent codes (leading sample dimensions broadcast).
        Returns:
            (..., B) log-density in nats.
        """
        return -0.5 * (LOG_2PI + self.log_variance + (z - self.mean).pow(2) / self.log_variance.exp()).sum(
            dim=-1
        )

    def kl_divergence_per_dim(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per latent dimension, in closed form (Kingma & Welling 2014, appendix B):
        0.5 * (mean^2 + sigma^2 - 1 - log sigma^2).

        Returns:
            (B, D) KL in nats, each entry >= 0.
        """
        return 0.5 * (self.mean.pow(2) + self.log_variance.exp() - 1.0 - self.log_variance)

    def kl_divergence(self) -> torch.Tensor:
        """(B,) KL(q(z|x) || N(0, I)) in nats per image (the sum over latent dimensions)."""
        return self.kl_divergence_per_dim().sum(dim=-1)
