"""Latent maps (Kingma & Welling 2014, fig. 4): the decoded manifold of a 2-D latent space, and a scatter of
the test set's posterior means coloured by class or attribute. Drawn with matplotlib (Agg, no display)."""

from __future__ import annotations

import io

import numpy as np
import torch

from pipeline.common import StageError
from vae.model import VAE


@torch.no_grad()
def manifold_grid(model: VAE, rows: int, device: torch.device) -> np.ndarray:
    """Decoded images of a ``rows`` x ``rows`` grid of 2-D latents z = Phi^-1(u), u evenly spaced in (0, 1)^2
    (u_i = (i + 0.5) / rows), so equal areas of the grid hold equal prior mass.

    Returns:
        float (rows * rows, C, H, W) in [0, 1], row-major with z_2 decreasing down the rows and z_1 increasing
        along them (the axes of a plot).
    Raises:
        StageError: the model's latent space is not 2-D.
    """
    if model.latent_dim != 2:
        raise StageError(f"the manifold grid needs model.latent_dim == 2, the model has {model.latent_dim}")
    u = (torch.arange(rows, dtype=torch.float32) + 0.5) / rows
    values = torch.distributions.Normal(0.0, 1.0).icdf(u)
    z2, z1 = torch.meshgrid(values.flip(0), values, indexing="ij")
    z = torch.stack([z1.flatten(), z2.flatten()], dim=1).to(device)
    model = model.to(device).eval()
    return model.likelihood.mean(model.decode(z)).float().cpu().numpy()


def most_active_dims(posterior_mean: np.ndarray) -> tuple[int, int]:
    """The two latent dimensions whose posterior means vary most over the test set (the most active units of
    Burda et al. 2016, sec. 5.2), largest first. ``posterior_mean``: (N, D) with D >= 2."""
    variances = posterior_mean.astype(np.float64).var(axis=0)
    first, second = np.argsort(variances)[::-1][:2]
    return int(first), int(second)


def scatter_png(posterior_mean: np.ndarray, colours: np.ndarray, names: list[str], title: str) -> bytes:
    """A PNG of the test set's posterior means on their two most active dimensions, one colour per class.

    Args:
        posterior_mean: (N, D) E_q[z] per test image, D >= 2.
        colours: (N,) integer class of each image (an index into ``names``).
        names: the legend's class names.
    Raises:
        StageError: D < 2, or ``colours`` not row-aligned with the means.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if posterior_mean.ndim != 2 or posterior_mean.shape[1] < 2:
        raise StageError(f"a latent scatter needs at least 2 latent dimensions, got {posterior_mean.shape}")
    if len(colours) != len(posterior_mean):
        raise StageError(f"{len(colours)} labels for {len(posterior_mean)} posterior means")
    first, second = most_active_dims(posterior_mean)
    figure, axes = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for value, name in enumerate(names):
        chosen = colours == value
        if chosen.any():
            axes.scatter(posterior_mean[chosen, first], posterior_mean[chosen, second], s=3, alpha=0.6,
                         color=cmap(value % cmap.N), label=name, rasterized=True)
    axes.set_xlabel(f"z[{first}] (posterior mean)")
    axes.set_ylabel(f"z[{second}] (posterior mean)")
    axes.set_title(title)
    axes.legend(markerscale=4, fontsize="small", loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
