"""Latent-space tools: reconstructions, prior samples, interpolations, traversals and attribute vectors.

Images in are uint8 (B, C, H, W); images out are float (B, C, H, W) in [0, 1] (the decoder's mean).
"""

from __future__ import annotations

import torch

from vae.model import VAE


@torch.no_grad()
def reconstruct(model: VAE, x: torch.Tensor) -> torch.Tensor:
    """Mean of p(x | z = E_q[z|x]) for uint8 images x (B, C, H, W) -> float (B, C, H, W) in [0, 1]."""
    return model(x)


@torch.no_grad()
def sample_prior(model: VAE, num_images: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Decoder means for z ~ N(0, I): float (N, C, H, W) in [0, 1]."""
    return model.sample(num_images, generator)


def interpolate(
    z_start: torch.Tensor, z_end: torch.Tensor, num_steps: int, method: str = "spherical"
) -> torch.Tensor:
    """Points between two latent codes (D,), endpoints included: (num_steps, D).

    ``linear``: (1 - t) z0 + t z1. ``spherical``: slerp (Shoemake 1985; White 2016 recommends it because
    high-dimensional Gaussian mass lies near a sphere, so linear midpoints have atypically small norms).

    Raises:
        ValueError: unknown method or num_steps < 2.
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    t = torch.linspace(0.0, 1.0, num_steps, device=z_start.device, dtype=z_start.dtype).unsqueeze(1)
    if method == "linear":
        return (1 - t) * z_start + t * z_end
    if method != "spherical":
        raise ValueError(f"method: unknown interpolation {method!r}; allowed: linear, spherical")
    cos_omega = torch.dot(z_start / z_start.norm(), z_end / z_end.norm()).clamp(-1.0, 1.0)
    omega = torch.arccos(cos_omega)
    if torch.sin(omega).abs() < 1e-6:  # (anti)parallel codes: slerp degenerates to lerp
        return (1 - t) * z_start + t * z_end
    return (torch.sin((1 - t) * omega) * z_start + torch.sin(t * omega) * z_end) / torch.sin(omega)


@torch.no_grad()
def interpolate_images(
    model: VAE, x_start: torch.Tensor, x_end: torch.Tensor, num_steps: int = 8, method: str = "spherical"
) -> torch.Tensor:
    """Decoded interpolation between the posterior means of two uint8 images (C, H, W): (num_steps, C, H,
    W)."""
    means = model.encode(torch.stack([x_start, x_end])).mean
    return model.likelihood.mean(model.decode(interpolate(means[0], means[1], num_steps, method)))


@torch.no_grad()
def traverse(model: VAE, z: torch.Tensor, dimension: int, values: torch.Tensor) -> torch.Tensor:
    """Decode ``z`` (D,) with latent ``dimension`` set to each of ``values`` (V,): (V, C, H, W).

    Raises:
        IndexError: dimension outside [0, D).
    """
    if not 0 <= dimension < z.shape[-1]:
        raise IndexError(f"dimension {dimension} outside the latent space [0, {z.shape[-1]})")
    codes = z.unsqueeze(0).repeat(values.shape[0], 1)
    codes[:, dimension] = values.to(codes)
    return model.likelihood.mean(model.decode(codes))


@torch.no_grad()
def attribute_vector(
    model: VAE, images: torch.Tensor, has_attribute: torch.Tensor, batch_size: int = 256
) -> torch.Tensor:
    """The attribute vector (White 2016, "Sampling generative networks", the "smile vector"): the mean
    posterior mean of images with the attribute minus that of images without it.

    Args:
        images: (N, C, H, W) uint8 images (CPU or device tensor; encoded in batches on the model's device).
        has_attribute: (N,) bool (or 0/1) labels.
    Returns:
        (D,) vector in latent space.
    Raises:
        ValueError: no image has, or every image has, the attribute.
    """
    has_attribute = has_attribute.bool().cpu()
    positives = int(has_attribute.sum())
    if positives == 0 or positives == has_attribute.numel():
        raise ValueError(
            "attribute_vector needs images with and without the "
            f"attribute; got {positives} of {has_attribute.numel()}"
        )
    device = next(model.parameters()).device
    sums = {
        True: torch.zeros(model.latent_dim, device=device, dtype=torch.float64),
        False: torch.zeros(model.latent_dim, device=device, dtype=torch.float64),
    }
    for start in range(0, images.shape[0], batch_size):
        means = model.encode(images[start : start + batch_size].to(device)).mean.double()
        mask = has_attribute[start : start + batch_size].to(device)
        sums[True] += means[mask].sum(dim=0)
        sums[False] += means[~mask].sum(dim=0)
    negatives = has_attribute.numel() - positives
    return (sums[True] / positives - sums[False] / negatives).float()


@torch.no_grad()
def apply_attribute_vector(
    model: VAE, x: torch.Tensor, vector: torch.Tensor, scales: torch.Tensor
) -> torch.Tensor:
    """Add ``scale * vector`` to the posterior means of uint8 images x (B, C, H, W) and decode.

    Returns:
        (B, S, C, H, W) float images in [0, 1], one per image and scale (scale 0 is the plain reconstruction).
    """
    means = model.encode(x).mean  # (B, D)
    codes = means.unsqueeze(1) + scales.to(means).view(1, -1, 1) * vector.to(means)  # (B, S, D)
    decoded = model.likelihood.mean(model.decode(codes.view(-1, codes.shape[-1])))
    return decoded.view(x.shape[0], scales.numel(), *decoded.shape[1:])
