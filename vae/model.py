"""The VAE: one small interface shared by every architecture and likelihood.

    encode(x) -> q(z|x)        decode(z) -> likelihood params        forward(x) -> reconstruction in [0, 1]
    elbo_terms(x) -> per-image reconstruction term and KL        sample(n) -> images from the prior

Inputs are always uint8 images (B, C, H, W); the model converts them to float on their device (so the data
path can move compact uint8 batches and convert on the GPU). The encoder sees x / 127.5 - 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vae.distributions import DiagonalGaussian
from vae.likelihoods import Likelihood, make_likelihood
from vae.networks import make_networks


@dataclass
class ELBOTerms:
    """Per-image terms of the evidence lower bound (Kingma & Welling 2014, eq. 3), in nats per image.

    Attributes:
        reconstruction: (B,) -E_q[log p(x|z)], the Monte-Carlo average over the L samples.
        kl_per_dim: (B, D) closed-form KL(q(z|x) || p(z)) per latent dimension.
        posterior: q(z|x).
    """

    reconstruction: torch.Tensor
    kl_per_dim: torch.Tensor
    posterior: DiagonalGaussian

    @property
    def kl(self) -> torch.Tensor:
        """(B,) KL(q(z|x) || p(z)) in nats per image."""
        return self.kl_per_dim.sum(dim=-1)

    def negative_elbo(self, beta: float = 1.0) -> torch.Tensor:
        """(B,) reconstruction + beta * KL in nats per image (beta = 1: the negative ELBO proper)."""
        return self.reconstruction + beta * self.kl


class VAE(nn.Module):
    """Gaussian-encoder VAE with a standard normal prior and a chosen likelihood p(x|z).

    Args:
        architecture: "mlp", "conv" or "resnet".
        image_shape: (C, H, W) of the uint8 inputs (square images for conv nets).
        latent_dim: D.
        hidden_dims: widths of the hidden layers / conv blocks, encoder order.
        likelihood: a name from :data:`vae.likelihoods.LIKELIHOODS`.
        gaussian_std: sigma of the fixed-variance Gaussian (initial sigma of the learned-scalar one).
    Raises:
        ValueError: an unknown architecture or likelihood (the message lists the allowed names).
    """

    def __init__(
        self,
        architecture: str = "conv",
        image_shape: tuple[int, int, int] = (3, 64, 64),
        latent_dim: int = 128,
        hidden_dims: list[int] | tuple[int, ...] = (32, 64, 128, 256, 512),
        likelihood: str = "discretized_logistic",
        gaussian_std: float = 0.1,
    ):
        super().__init__()
        self.config: dict[str, Any] = {
            "architecture": architecture, "image_shape": list(image_shape), "latent_dim": latent_dim,
            "hidden_dims": list(hidden_dims), "likelihood": likelihood, "gaussian_std": gaussian_std,
        }
        self.image_shape = tuple(image_shape)
        self.latent_dim = latent_dim
        self.likelihood: Likelihood = make_likelihood(likelihood, gaussian_std)
        self.encoder, self.decoder = make_networks(
            architecture,
            self.image_shape,
            list(hidden_dims),
            latent_dim,
            self.likelihood.param_channels(image_shape[0]),
        )

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> VAE:
        """Rebuild a model from :attr:`config` (as saved next to the weights)."""
        return cls(**{**config, "image_shape": tuple(config["image_shape"])})

    @property
    def num_dims(self) -> int:
        """D_x = C * H * W, the number of subpixels per image (for bits per dimension)."""
        c, h, w = self.image_shape
        return c * h * w

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float in [-1, 1], in the encoder's parameter dtype/memory format."""
        # out-of-place first op: .to() returns x itself for float32 input, which mul_ would overwrite
        return x.to(torch.float32).mul(1.0 / 127.5).sub_(1.0)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for uint8 images (B, C, H, W); mean and log-variance are (B, D) float32."""
        out = self.encoder(self.encoder_input(x)).float()
        mean, log_variance = out.chunk(2, dim=-1)
        return DiagonalGaussian(mean, log_variance.clamp(-30.0, 20.0))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Likelihood parameters (N, P, H, W) for latents (N, D)."""
        return self.decoder(z)

    def elbo_terms(
        self,
        x: torch.Tensor,
        num_samples: int = 1,
        generator: torch.Generator | None = None,
        target: torch.Tensor | None = None,
    ) -> ELBOTerms:
        """Reconstruction term and closed-form KL for uint8 images x (B, C, H, W) with L = num_samples
        reparameterized samples per image (Kingma & Welling 2014, eq. 10).

        ``target`` (from ``likelihood.prepare_target``) may be passed to fix the binarization/dequantization
        noise; by default fresh noise is drawn.
        """
        posterior = self.encode(x)
        z = posterior.rsample(num_samples, generator)  # (L, B, D)
        if target is None:
            target = self.likelihood.prepare_target(x, generator)
        batch = x.shape[0]
        params = self.decode(z.reshape(num_samples * batch, -1))
        repeated = target if num_samples == 1 else target.repeat(num_samples, *([1] * (target.dim() - 1)))
        log_likelihood = self.likelihood.log_prob(params, repeated).view(num_samples, batch)
        return ELBOTerms(-log_likelihood.mean(dim=0), posterior.kl_divergence_per_dim(), posterior)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction: the mean of p(x | z = E_q[z]) as float (B, C, H, W) in [0, 1].

        Export-traceable, so the logged model's ``predict`` is a reconstruction.
        """
        return self.likelihood.mean(self.decode(self.encode(x).mean))

    @torch.no_grad()
    def sample(
        self,
        num_images: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Images from the prior: z ~ N(0, I), returned as the mean of p(x|z), float (N, C, H, W) in [0,
        1]."""
        device = device or next(self.parameters()).device
        noise_device = generator.device if generator is not None else device
        z = torch.randn(num_images, self.latent_dim, generator=generator, device=noise_device).to(device)
        return self.likelihood.mean(self.decode(z))


class ELBOObjective(nn.Module):
    """Wraps a VAE so that ``forward`` computes the ELBO terms: the module to hand to DistributedDataParallel
    (DDP synchronises gradients of what runs in the wrapped module's ``forward``)."""

    def __init__(self, model: VAE):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, num_samples: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (reconstruction (B,), kl_per_dim (B, D)) in nats."""
        terms = self.model.elbo_terms(x, num_samples)
        return terms.reconstruction, terms.kl_per_dim
