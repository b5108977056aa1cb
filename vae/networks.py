"""Encoders and decoders: MLP, convolutional (the common CelebA-64 form) and residual.

Encoders map float images (B, C, H, W) in [-1, 1] to (B, 2 * latent_dim): the posterior mean and log-variance.
Decoders map latents (N, latent_dim) to likelihood parameters (N, P, H, W).

The convolutional nets follow the form most CelebA VAE code uses (e.g. AntixK/PyTorch-VAE's VanillaVAE): one
stride-2 3x3 conv + batch norm + LeakyReLU block per entry of ``hidden_dims`` (32-64-128-256-512), a linear
layer to the posterior parameters, and a mirrored decoder of stride-2 transposed convs ending in a 3x3 conv to
the likelihood's parameter channels (no Tanh: the likelihood decides the output's range). Any square size
works: the input is zero-padded to the next multiple of 2^len(hidden_dims) and the output cropped back, so
28x28 MNIST goes through the same five blocks (28 -> 32 -> 1x1) as 64x64 CelebA (64 -> 2x2).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def _padding(size: int, num_blocks: int) -> tuple[int, int]:
    """(padded size, left padding) so that padded size is a multiple of 2**num_blocks."""
    multiple = 2**num_blocks
    padded = math.ceil(size / multiple) * multiple
    return padded, (padded - size) // 2


class MLPEncoder(nn.Module):
    """Flatten -> [Linear -> ReLU] * len(hidden_dims) -> Linear(2 * latent_dim)."""

    def __init__(self, image_shape: tuple[int, int, int], hidden_dims: list[int], latent_dim: int):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(image_shape)
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, 2 * latent_dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """Linear(latent) -> [ReLU -> Linear] ... -> (N, P, H, W)."""

    def __init__(self, latent_dim: int, hidden_dims: list[int], out_shape: tuple[int, int, int]):
        super().__init__()
        layers: list[nn.Module] = []
        width = latent_dim
        for hidden in reversed(hidden_dims):
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, math.prod(out_shape)))
        self.net = nn.Sequential(*layers)
        self.out_shape = out_shape

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)


def _down_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2),
    )


def _up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2),
    )


class ResidualBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): x + conv3x3(act(bn(conv3x3(act(bn(x))))))."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.LeakyReLU(0.2),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConvEncoder(nn.Module):
    """Stride-2 conv blocks (optionally each followed by a residual block), then a linear layer to
    2*latent_dim.

    Input (B, C, S, S) for any S; output (B, 2 * latent_dim).
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        hidden_dims: list[int],
        latent_dim: int,
        residual: bool = False,
    ):
        super().__init__()
        channels, height, width = image_shape
        if height != width:
            raise ValueError(f"ConvEncoder needs square images, got {height}x{width}")
        self.padded_size, self.pad = _padding(height, len(hidden_dims))
        blocks: list[nn.Module] = []
        in_channels = channels
        for hidden in hidden_dims:
            blocks.append(_down_block(in_channels, hidden))
            if residual:
                blocks.append(ResidualBlock(hidden))
            in_channels = hidden
        self.features = nn.Sequential(*blocks)
        self.final_size = self.padded_size // 2 ** len(hidden_dims)
        self.head = nn.Linear(hidden_dims[-1] * self.final_size**2, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad:
            extra = self.padded_size - x.shape[-1] - self.pad
            x = nn.functional.pad(x, (self.pad, extra, self.pad, extra))
        return self.head(self.features(x).flatten(1))


class ConvDecoder(nn.Module):
    """The mirror of :class:`ConvEncoder`: linear -> (hidden_dims[-1], s, s) -> stride-2 transposed convs ->
    3x3 conv to ``out_channels``; output cropped to (N, out_channels, S, S)."""

    def __init__(
        self,
        latent_dim: int,
        hidden_dims: list[int],
        out_channels: int,
        image_size: int,
        residual: bool = False,
    ):
        super().__init__()
        self.image_size = image_size
        self.padded_size, self.pad = _padding(image_size, len(hidden_dims))
        self.start_size = self.padded_size // 2 ** len(hidden_dims)
        reversed_dims = list(reversed(hidden_dims))
        self.start_channels = reversed_dims[0]
        self.project = nn.Linear(latent_dim, self.start_channels * self.start_size**2)
        blocks: list[nn.Module] = []
        for in_channels, out in zip(reversed_dims, reversed_dims[1:] + [reversed_dims[-1]], strict=True):
            if residual:
                blocks.append(ResidualBlock(in_channels))
            blocks.append(_up_block(in_channels, out))
        self.features = nn.Sequential(*blocks)
        self.output = nn.Conv2d(reversed_dims[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(z.shape[0], self.start_channels, self.start_size, self.start_size)
        out = self.output(self.features(h))
        if self.pad:
            out = out[..., self.pad : self.pad + self.image_size, self.pad : self.pad + self.image_size]
        return out


ARCHITECTURES = ("mlp", "conv", "resnet")


def make_networks(
    architecture: str,
    image_shape: tuple[int, int, int],
    hidden_dims: list[int],
    latent_dim: int,
    param_channels: int,
) -> tuple[nn.Module, nn.Module]:
    """(encoder, decoder) for ``architecture`` in :data:`ARCHITECTURES`.

    Raises:
        ValueError: unknown architecture (lists the allowed ones), or hidden_dims that do not fit the image.
    """
    channels, size, _ = image_shape
    if architecture == "mlp":
        return (
            MLPEncoder(image_shape, hidden_dims, latent_dim),
            MLPDecoder(latent_dim, hidden_dims, (param_channels, size, size)),
        )
    if architecture in ("conv", "resnet"):
        residual = architecture == "resnet"
        return (
            ConvEncoder(image_shape, hidden_dims, latent_dim, residual),
            ConvDecoder(latent_dim, hidden_dims, param_channels, size, residual),
        )
    raise ValueError(
        f"model.architecture: unknown architecture {architecture!r}; allowed: {', '.join(ARCHITECTURES)}"
    )
