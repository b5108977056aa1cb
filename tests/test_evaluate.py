"""The evaluate stage's figures (pipeline.evaluate.test_figures, the code the stage runs) against a model
whose log-likelihood is known in closed form, and in both precisions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.evaluate import test_figures as evaluate_figures
from vae.model import VAE

SIGMA = 0.1  # the fixed decoder standard deviation
SCALES = torch.tensor([0.3, 0.2])  # the lengths of W's orthogonal columns
SHAPE = (1, 4, 4)
D = 16
DEQUANTIZATION_VARIANCE = 1.0 / (12 * 256**2)  # Var(u / 256), u ~ U(0, 1)


def linear_gaussian_vae(seed: int = 0) -> tuple[VAE, torch.Tensor, torch.Tensor]:
    """Probabilistic PCA as a VAE (Tipping & Bishop 1999): z ~ N(0, I_2), y | z ~ N(W z + b, sigma^2 I_16), so
    p(y) = N(b, W W^T + sigma^2 I). W has orthogonal columns, so the exact posterior is a diagonal Gaussian,
    N(M^-1 W^T (y - b), sigma^2 M^-1) with M = W^T W + sigma^2 I, and the encoder is set to it (for the bin
    centre y = (x + 1/2) / 256 of the 8-bit image it sees). Returns (model, W, b)."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(D, 2, generator=generator))
    weight = basis * SCALES
    bias = 0.3 + 0.4 * torch.rand(D, generator=generator)
    model = VAE("mlp", SHAPE, 2, [], "gaussian_fixed", SIGMA).eval()
    m_diag = SCALES**2 + SIGMA**2
    gain = weight.T / m_diag[:, None]  # M^-1 W^T, (2, D)
    # The encoder sees e = x / 127.5 - 1, so the bin centre is y = (127.5 (e + 1) + 0.5) / 256 = a e + c.
    a, c = 127.5 / 256, 128.0 / 256
    encoder, decoder = model.encoder.net[-1], model.decoder.net[-1]
    with torch.no_grad():
        encoder.weight.copy_(torch.cat([gain * a, torch.zeros(2, D)]))
        encoder.bias.copy_(torch.cat([gain @ (c - bias), torch.log(SIGMA**2 / m_diag)]))
        decoder.weight.copy_(weight)
        decoder.bias.copy_(bias)
    return model, weight, bias


def exact_expected_log_likelihood(
    images: np.ndarray, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """E_u[log p(y)] per image for y = (x + u) / 256, u ~ U(0, 1)^D, in closed form: the Gaussian's
    log-density at the bin centre minus tr(Sigma^-1) Var(u / 256) / 2. Float64, (N,) nats."""
    covariance = (weight @ weight.T + SIGMA**2 * torch.eye(D)).double()
    centre = (torch.from_numpy(images).double().reshape(len(images), D) + 0.5) / 256
    gaussian = torch.distributions.MultivariateNormal(bias.double(), covariance)
    return gaussian.log_prob(centre) - 0.5 * torch.linalg.inv(covariance).trace() * DEQUANTIZATION_VARIANCE


@pytest.fixture(scope="module")
def ppca():
    model, weight, bias = linear_gaussian_vae()
    with torch.no_grad():  # images drawn from the model itself, quantised to 8 bits
        y = model.sample(300, torch.Generator().manual_seed(1)) + SIGMA * torch.randn(
            300, *SHAPE, generator=torch.Generator().manual_seed(2)
        )
    images = (y.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return model, images, exact_expected_log_likelihood(images, weight, bias)


def test_importance_sampled_nll_equals_the_exact_log_likelihood(ppca):
    """With the exact posterior as the proposal, every importance weight is p(y): the stage's NLL is exact up
    to the spread of the dequantization noise (one draw per image: 0.13 nats per image, 0.01 over 300
    images)."""
    model, images, exact = ppca
    figures = evaluate_figures(model, images, 64, 16, 100, torch.device("cpu"))
    assert figures["num_test_images"] == 300
    assert figures["test_nll"] == pytest.approx(-float(exact.mean()), abs=0.05)
    # The ELBO's gap is KL(q || p(z|y)): tiny for this exact posterior, and the bound holds.
    assert figures["test_nll"] <= figures["test_negative_elbo"] + 1e-3
    assert figures["test_negative_elbo"] == pytest.approx(-float(exact.mean()), abs=0.1)
    assert figures["test_nll_bits_per_dim"] == pytest.approx(
        (figures["test_nll"] + D * math.log(256)) / (D * math.log(2))
    )
    assert figures["precision"] == "fp32"


def test_the_exact_value_tells_a_slightly_different_model(ppca):
    """The tolerance above is tight enough to fail: a decoder mean off by 0.05 (half of sigma) moves the NLL
    by
    more than 10 times the tolerance."""
    model, images, exact = ppca
    with torch.no_grad():
        model.decoder.net[-1].bias.add_(0.05)
    try:
        figures = evaluate_figures(model, images, 64, 16, 100, torch.device("cpu"))
    finally:
        with torch.no_grad():
            model.decoder.net[-1].bias.sub_(0.05)
    assert abs(figures["test_nll"] + float(exact.mean())) > 0.5


def test_bf16_evaluates_the_elbo_and_the_nll_alike_within_a_small_bias(ppca):
    """evaluate.precision applies to both figures (each moves), and bf16's rounding of the decoder's output
    biases them by little here (the likelihood itself is evaluated in fp32)."""
    model, images, _ = ppca
    fp32 = evaluate_figures(model, images, 64, 16, 100, torch.device("cpu"), precision="fp32")
    bf16 = evaluate_figures(model, images, 64, 16, 100, torch.device("cpu"), precision="bf16")
    assert bf16["precision"] == "bf16"
    for key in ("test_negative_elbo", "test_nll"):
        assert bf16[key] != fp32[key], f"{key} was not computed in bf16"
        assert bf16[key] == pytest.approx(fp32[key], abs=2.0), key
    assert bf16["test_nll"] <= bf16["test_negative_elbo"] + 1e-3
