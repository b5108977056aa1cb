"""q(z|x) = N(mean, diag(sigma^2)) and the prior N(0, I): closed-form KL, densities and the
reparameterization.

Tolerances: closed forms are compared in float64 to 1e-12 (they are the same formula up to rounding);
Monte-Carlo checks use 200,000 samples from a fixed seed and allow 5 standard errors, where the standard error
is estimated from the same samples (a correct implementation fails such a check with probability ~6e-7 per
comparison; a wrong formula is off by many standard errors).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vae.distributions import DiagonalGaussian, standard_normal_log_prob
from vae.model import VAE

NUM_MC = 200_000
MC_SIGMAS = 5.0


def _posterior(batch: int = 4, dim: int = 3, seed: int = 0, dtype=torch.float64) -> DiagonalGaussian:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(batch, dim, generator=generator, dtype=dtype) * 1.5
    log_variance = torch.randn(batch, dim, generator=generator, dtype=dtype) * 1.2
    return DiagonalGaussian(mean, log_variance)


def test_kl_closed_form_matches_torch_distributions():
    q = _posterior(batch=16, dim=8)
    expected = kl_divergence(Normal(q.mean, q.std), Normal(torch.zeros_like(q.mean), torch.ones_like(q.mean)))
    torch.testing.assert_close(q.kl_divergence_per_dim(), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.kl_divergence(), expected.sum(-1), rtol=0, atol=1e-12)
    assert q.kl_divergence_per_dim().shape == (16, 8) and q.kl_divergence().shape == (16,)


def test_kl_closed_form_matches_monte_carlo():
    """KL(q || p) = E_q[log q(z) - log p(z)], per dimension, estimated with 200k reparameterized samples."""
    q = _posterior(batch=4, dim=3)
    z = q.rsample(NUM_MC, generator=torch.Generator().manual_seed(1))  # (N, B, D)
    per_dim_log_ratio = (Normal(q.mean, q.std).log_prob(z) - Normal(0.0, 1.0).log_prob(z))  # (N, B, D)
    estimate = per_dim_log_ratio.mean(0)
    standard_error = per_dim_log_ratio.std(0) / math.sqrt(NUM_MC)
    error = (estimate - q.kl_divergence_per_dim()).abs()
    assert (error < MC_SIGMAS * standard_error).all(), (error / standard_error).max()
    # and through the library's own densities, summed over dimensions
    log_ratio = q.log_prob(z) - standard_normal_log_prob(z)  # (N, B)
    error = (log_ratio.mean(0) - q.kl_divergence()).abs()
    assert (error < MC_SIGMAS * log_ratio.std(0) / math.sqrt(NUM_MC)).all()


def test_kl_is_nonnegative_and_zero_exactly_at_the_prior():
    q = _posterior(batch=64, dim=16, seed=3)
    assert (q.kl_divergence_per_dim() >= 0).all()
    extreme = DiagonalGaussian(torch.tensor([[0.0, 1e-4, 30.0, -30.0, 0.0, 0.0]], dtype=torch.float64),
                               torch.tensor([[1e-4, 0.0, 0.0, 0.0, -30.0, 20.0]], dtype=torch.float64))
    assert (extreme.kl_divergence_per_dim() >= 0).all()
    prior = DiagonalGaussian(torch.zeros(2, 5), torch.zeros(2, 5))
    assert torch.equal(prior.kl_divergence_per_dim(), torch.zeros(2, 5))
    # hand value: mean 1, sigma^2 = e -> 0.5 * (1 + e - 1 - 1) = 0.5 * (e - 1)
    one = DiagonalGaussian(
        torch.tensor([[1.0]], dtype=torch.float64), torch.tensor([[1.0]], dtype=torch.float64)
    )
    assert one.kl_divergence().item() == pytest.approx(0.5 * (math.e - 1.0), abs=1e-14)


def test_log_probs_match_torch_distributions():
    q = _posterior(batch=5, dim=4)
    z = torch.randn(7, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(q.log_prob(z), Normal(q.mean, q.std).log_prob(z).sum(-1), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        standard_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1), rtol=0, atol=1e-12
    )
    assert q.log_prob(z).shape == (7, 5)


def test_rsample_shape_mean_and_std():
    q = _posterior(batch=3, dim=2)
    assert q.rsample(5).shape == (5, 3, 2)
    assert q.rsample().shape == (1, 3, 2)
    z = q.rsample(NUM_MC, generator=torch.Generator().manual_seed(4))
    assert z.dtype == torch.float64
    mean_error = (z.mean(0) - q.mean).abs()
    assert (mean_error < MC_SIGMAS * q.std / math.sqrt(NUM_MC)).all()
    # the sample standard deviation of N Gaussian draws has standard error ~ sigma / sqrt(2N)
    std_error = (z.std(0) - q.std).abs()
    assert (std_error < MC_SIGMAS * q.std / math.sqrt(2 * NUM_MC)).all()


def test_rsample_is_reproducible_with_a_generator():
    q = _posterior()
    a = q.rsample(3, generator=torch.Generator().manual_seed(7))
    b = q.rsample(3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_reparameterization_gradients_are_exact():
    """z = mean + exp(log_variance / 2) * eps: dz/dmean = 1, dz/dlog_variance = sigma * eps / 2."""
    mean = torch.tensor([[0.3, -1.0]], dtype=torch.float64, requires_grad=True)
    log_variance = torch.tensor([[0.5, -2.0]], dtype=torch.float64, requires_grad=True)
    q = DiagonalGaussian(mean, log_variance)
    z = q.rsample(4, generator=torch.Generator().manual_seed(5))
    z.sum().backward()
    eps = (z.detach() - mean.detach()) / q.std.detach()
    torch.testing.assert_close(mean.grad, torch.full_like(mean, 4.0))
    torch.testing.assert_close(log_variance.grad, (0.5 * q.std.detach() * eps).sum(0))


def test_reparameterized_gradient_is_unbiased():
    """d/dtheta E_q[z^2] with E_q[z^2] = mean^2 + sigma^2: d/dmean = 2 mean, d/dlog_variance = sigma^2."""
    mean = torch.tensor([[0.7, -0.4]], dtype=torch.float64, requires_grad=True)
    log_variance = torch.tensor([[-0.3, 0.6]], dtype=torch.float64, requires_grad=True)
    z = DiagonalGaussian(mean, log_variance).rsample(NUM_MC, generator=torch.Generator().manual_seed(6))
    per_sample = z.pow(2)  # (N, 1, 2)
    per_sample.mean(0).sum().backward()
    sigma = (0.5 * log_variance.detach()).exp()
    # per-sample gradients: 2 z for the mean, z * sigma * eps = z * (z - mean) for the log-variance
    grad_mean_samples = 2 * z.detach()
    grad_logvar_samples = z.detach() * (z.detach() - mean.detach())
    se_mean = grad_mean_samples.std(0) / math.sqrt(NUM_MC)
    se_logvar = grad_logvar_samples.std(0) / math.sqrt(NUM_MC)
    assert ((mean.grad - 2 * mean.detach()).abs() < MC_SIGMAS * se_mean).all()
    assert ((log_variance.grad - sigma.pow(2)).abs() < MC_SIGMAS * se_logvar).all()


@pytest.mark.parametrize("architecture, hidden_dims", [("mlp", [16]), ("conv", [4, 8])])
def test_gradients_reach_the_encoder_through_rsample(architecture, hidden_dims):
    """The reconstruction term depends on the encoder only through z = mean + sigma * eps, so non-zero encoder
    gradients from it prove the sample is reparameterized (a detached sample would give None/zero)."""
    torch.manual_seed(0)
    model = VAE(architecture, (1, 8, 8), latent_dim=3, hidden_dims=hidden_dims, likelihood="gaussian_fixed")
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    terms = model.elbo_terms(x, num_samples=2, generator=torch.Generator().manual_seed(2))
    assert terms.reconstruction.shape == (4,) and terms.kl_per_dim.shape == (4, 3)
    terms.reconstruction.sum().backward()
    encoder_grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in encoder_grads)
    assert sum(g.abs().sum().item() for g in encoder_grads) > 0
    # the last encoder layer feeds both mean and log-variance; both halves get gradient
    head = [m for m in model.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.weight.grad[:3].abs().sum() > 0 and head.weight.grad[3:].abs().sum() > 0
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder.parameters() if p.dim() > 1
    )
