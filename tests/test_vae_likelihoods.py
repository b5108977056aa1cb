"""Likelihoods p(x|z): normalisation of the discrete ones, agreement of the Gaussians with
torch.distributions,
parameter layouts, target mappings, and bits per dimension by hand.

Tolerances: "sums to 1" is checked as |logsumexp over all values of log p| < 1e-5 nats, i.e. the total mass
is 1 to 1e-5 relative. The likelihoods compute in float32, whose rounding alone (~6e-8 per operation) puts the
sum within ~2e-7 of 1; 1e-5 leaves a margin while still catching a mis-normalised bin of mass 1e-5 (the
PixelCNN++ underflow fallback that this library used to have missed by 1.6e-5 at tiny scales). Gaussian
densities are compared with torch.distributions in float32 to 1e-6 relative + 1e-4 nats per image (sums of
75 terms of size up to ~100 nats: float32 rounding of the sum alone is ~1e-4 nats).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from vae.likelihoods import LIKELIHOODS, DiscretizedLogistic, make_likelihood
from vae.objectives import bits_per_dim

SUM_TO_ONE_TOL = 1e-5
LEVELS = torch.arange(256)


def _log_mass_of_all_values(likelihood, pixel_params: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """log P(x = v) for every pixel and every value v, using the library's log_prob on 1x1 single-channel
    images.

    pixel_params: (N, P) one row of parameters per pixel; values: (V,) the uint8 values.
    Returns (N, V).
    """
    n, p = pixel_params.shape
    v = values.numel()
    params = pixel_params.repeat_interleave(v, dim=0).view(n * v, p, 1, 1)
    x = values.repeat(n).to(torch.uint8).view(n * v, 1, 1, 1)
    target = likelihood.prepare_target(x, noise=False)
    return likelihood.log_prob(params, target).view(n, v)


# ---------------------------------------------------------------------------------------------- sum to one


@pytest.mark.parametrize("logit_scale", [1.0, 10.0, 100.0])
def test_categorical_256_sums_to_one(logit_scale):
    likelihood = make_likelihood("categorical_256")
    logits = torch.randn(50, 256, generator=torch.Generator().manual_seed(0)) * logit_scale
    log_mass = _log_mass_of_all_values(likelihood, logits, LEVELS)
    assert torch.logsumexp(log_mass.double(), dim=1).abs().max() < SUM_TO_ONE_TOL


def test_categorical_256_layout_is_channel_major():
    """params (B, C*256, H, W): channel c's 256 logits are params[:, c*256:(c+1)*256]."""
    likelihood = make_likelihood("categorical_256")
    generator = torch.Generator().manual_seed(1)
    params = torch.randn(2, 3 * 256, 2, 2, generator=generator) * 3
    x = torch.randint(0, 256, (2, 3, 2, 2), generator=generator, dtype=torch.uint8)
    expected = torch.zeros(2)
    for c in range(3):
        log_probs = F.log_softmax(params[:, c * 256 : (c + 1) * 256], dim=1)  # (B, 256, H, W)
        expected += log_probs.gather(1, x[:, c : c + 1].long()).sum(dim=(1, 2, 3))
    torch.testing.assert_close(
        likelihood.log_prob(params, likelihood.prepare_target(x)), expected, rtol=0, atol=1e-4
    )
    assert likelihood.param_channels(3) == 768


def _logistic_params(means, log_scales) -> torch.Tensor:
    grid = torch.cartesian_prod(
        torch.as_tensor(means, dtype=torch.float32), torch.as_tensor(log_scales, dtype=torch.float32)
    )
    return grid  # (N, 2): (mu, log s) per pixel, the layout of a C = 1 image


def test_discretized_logistic_sums_to_one_for_random_parameters():
    likelihood = make_likelihood("discretized_logistic")
    generator = torch.Generator().manual_seed(2)
    params = torch.stack(
        [torch.rand(400, generator=generator) * 2.4 - 1.2, torch.rand(400, generator=generator) * 9.0 - 7.0],
        dim=1,
    )
    log_mass = _log_mass_of_all_values(likelihood, params, LEVELS)
    assert torch.logsumexp(log_mass.double(), dim=1).abs().max() < SUM_TO_ONE_TOL


def test_discretized_logistic_sums_to_one_for_extreme_parameters():
    """Large |mean| (all mass in an edge bin), tiny scales (log s at and below the -7 clamp: nearly all mass
    in one bin), means exactly on bin edges (where float32 edges computed as c +- 1/255 disagree by an ulp),
    and huge scales (nearly uniform over the real line, so mass piles into the two open edge bins)."""
    likelihood = make_likelihood("discretized_logistic")
    bin_centres = LEVELS.float() / 127.5 - 1.0
    means = torch.cat(
        [
            torch.tensor([-1e4, -50.0, -3.0, -1.0, 0.0, 1.0, 3.0, 50.0, 1e4]),
            bin_centres[::5],
            bin_centres[::5] + 1.0 / 255.0,
            bin_centres[::7] + 0.4 / 255.0,
        ]
    )
    log_scales = torch.tensor([-1e3, -30.0, -7.0, -6.0, -4.5, -2.0, 0.0, 3.0, 10.0, 30.0, 90.0, 1e3])
    params = _logistic_params(means, log_scales)
    log_mass = _log_mass_of_all_values(likelihood, params, LEVELS)
    assert torch.isfinite(log_mass).all() or (log_mass[~torch.isfinite(log_mass)] == -math.inf).all()
    total = torch.logsumexp(log_mass.double(), dim=1)
    assert total.abs().max() < SUM_TO_ONE_TOL, params[total.abs().argmax()]


def _logistic_bin_mass64(params: torch.Tensor) -> torch.Tensor:
    """Reference P(x = v) for every pixel (row of params) and v, in float64: F(upper) - F(lower) for bins left
    of the mean, and (1 - F(lower)) - (1 - F(upper)) right of it, so the difference never cancels near 1."""
    c = (LEVELS.double() / 127.5 - 1.0).view(1, 256)
    mean, log_scale = params.double()[:, :1], params.double()[:, 1:]
    inv_scale = torch.exp(-log_scale.clamp(min=-7.0))
    upper = torch.where(LEVELS == 255, torch.inf, c + 1.0 / 255.0)
    lower = torch.where(LEVELS == 0, -torch.inf, c - 1.0 / 255.0)
    left = torch.sigmoid((upper - mean) * inv_scale) - torch.sigmoid((lower - mean) * inv_scale)
    right = torch.sigmoid((mean - lower) * inv_scale) - torch.sigmoid((mean - upper) * inv_scale)
    return torch.where(c < mean, left, right)


def test_discretized_logistic_matches_a_float64_reference():
    """P(x) = F((c + 1/255 - mu)/s) - F((c - 1/255 - mu)/s), edge bins open (Salimans et al. 2017, eq. 2),
    computed in float64. The float32 bin edges are off by up to half an ulp (3e-8 near |c| = 1); at s = e^-7
    the logistic density is up to e^7 / 4 = 274 per unit, so a bin may move by ~1e-5: every bin agrees to 2e-5
    absolute. The same shift moves a logistic argument by up to 3e-8 * e^7 = 3.3e-5, a relative change of the
    mass of about that size: every bin with mass > 1e-30 agrees to 2e-4 relative."""
    likelihood = make_likelihood("discretized_logistic")
    params = _logistic_params([-1.5, -0.99, -0.3, 0.0, 0.0123, 0.5, 1.0, 2.0], [-7.0, -5.0, -3.0, -1.0, 1.0])
    log_mass = _log_mass_of_all_values(likelihood, params, LEVELS).double()
    reference = _logistic_bin_mass64(params)
    torch.testing.assert_close(log_mass.exp(), reference, rtol=0, atol=2e-5)
    resolved = reference > 1e-30
    relative = (log_mass.exp()[resolved] - reference[resolved]).abs() / reference[resolved]
    assert relative.max() < 2e-4


def test_discretized_logistic_gradients_are_finite_for_extreme_parameters():
    """log s is bounded on both sides: below, the bins' masses underflow; above (log s >= ~88), 1/s underflows
    in float32 and a middle bin's log-mass and its gradient would be -inf / NaN."""
    likelihood = make_likelihood("discretized_logistic")
    params = _logistic_params(
        [-1e3, -1.0, 0.0, 1.0, 1e3], [-1e3, -90.0, -30.0, -7.0, 0.0, 7.0, 30.0, 88.0, 90.0, 1e3]
    ).view(-1, 2, 1, 1)
    params = params.repeat(3, 1, 1, 1).requires_grad_(True)
    x = torch.tensor([0, 128, 255]).repeat_interleave(params.shape[0] // 3).to(torch.uint8).view(-1, 1, 1, 1)
    log_prob = likelihood.log_prob(params, likelihood.prepare_target(x))
    log_prob.sum().backward()
    assert torch.isfinite(log_prob).all() and torch.isfinite(params.grad).all()


@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_bernoulli_sums_to_one_over_zero_and_one(logit_scale):
    likelihood = make_likelihood("bernoulli")
    logits = torch.randn(200, 1, generator=torch.Generator().manual_seed(3)) * logit_scale
    params = logits.repeat_interleave(2, dim=0).view(-1, 1, 1, 1)
    target = torch.tensor([0.0, 1.0]).repeat(200).view(-1, 1, 1, 1)
    log_mass = likelihood.log_prob(params, target).view(200, 2)
    assert torch.logsumexp(log_mass.double(), dim=1).abs().max() < SUM_TO_ONE_TOL
    torch.testing.assert_close(log_mass[:, 1], F.logsigmoid(logits[:, 0]))


# ---------------------------------------------------------------------------------------------- Gaussians


def _gaussian_case(channels: int = 3, seed: int = 4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (4, 3, 5, 5), generator=generator, dtype=torch.uint8)
    mean = torch.rand(4, 3, 5, 5, generator=generator)
    return generator, x, mean


def test_gaussian_fixed_matches_torch_normal():
    likelihood = make_likelihood("gaussian_fixed", gaussian_std=0.05)
    generator, x, mean = _gaussian_case()
    target = likelihood.prepare_target(x, generator)
    expected = Normal(mean, 0.05).log_prob(target).sum(dim=(1, 2, 3))
    torch.testing.assert_close(likelihood.log_prob(mean, target), expected, rtol=1e-6, atol=1e-4)
    assert likelihood.param_channels(3) == 3 and not likelihood.discrete
    # the "MSE form": -log p = ||y - mu||^2 / (2 sigma^2) + D (log sigma + log(2 pi) / 2)
    mse_form = (target - mean).pow(2).sum(dim=(1, 2, 3)) / (2 * 0.05**2) + 75 * (
        math.log(0.05) + 0.5 * math.log(2 * math.pi)
    )
    torch.testing.assert_close(-likelihood.log_prob(mean, target), mse_form, rtol=1e-6, atol=1e-3)


def test_gaussian_learned_scalar_matches_torch_normal_and_learns():
    likelihood = make_likelihood("gaussian_learned_scalar", gaussian_std=0.2)
    generator, x, mean = _gaussian_case()
    target = likelihood.prepare_target(x, generator)
    with torch.no_grad():
        likelihood.log_std.fill_(math.log(0.3))
    expected = Normal(mean, 0.3).log_prob(target).sum(dim=(1, 2, 3))
    log_p = likelihood.log_prob(mean, target)
    torch.testing.assert_close(log_p, expected, rtol=1e-6, atol=1e-4)
    log_p.sum().backward()
    assert likelihood.log_std.grad is not None and likelihood.log_std.grad.abs() > 0


def test_gaussian_learned_pixel_matches_torch_normal_with_clamped_log_std():
    likelihood = make_likelihood("gaussian_learned_pixel")
    generator, x, mean = _gaussian_case()
    target = likelihood.prepare_target(x, generator)
    log_std = torch.randn(4, 3, 5, 5, generator=generator) * 4  # some outside [-7, 2]
    expected = Normal(mean, log_std.clamp(-7.0, 2.0).exp()).log_prob(target).sum(dim=(1, 2, 3))
    torch.testing.assert_close(
        likelihood.log_prob(torch.cat([mean, log_std], dim=1), target), expected, rtol=1e-6, atol=1e-2
    )
    assert likelihood.param_channels(3) == 6
    assert torch.equal(likelihood.mean(torch.cat([mean, log_std], dim=1)), mean.clamp(0, 1))


def test_gaussian_targets_are_uniformly_dequantized_into_the_pixel_bin():
    likelihood = make_likelihood("gaussian_fixed")
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).repeat(50, 1, 1, 1)
    y = likelihood.prepare_target(x, torch.Generator().manual_seed(5))
    assert (y >= x / 256.0).all() and (y < (x.float() + 1) / 256.0).all()
    assert (y * 256 - x).mean().item() == pytest.approx(0.5, abs=0.01)  # u ~ U(0, 1): mean 1/2, se 0.0026
    torch.testing.assert_close(likelihood.prepare_target(x, noise=False), (x.float() + 0.5) / 256.0)


def test_discrete_targets():
    x = torch.tensor([0, 1, 127, 128, 254, 255], dtype=torch.uint8).view(1, 1, 1, 6)
    assert torch.equal(make_likelihood("categorical_256").prepare_target(x), x.long())
    torch.testing.assert_close(
        make_likelihood("discretized_logistic").prepare_target(x), x.float() / 127.5 - 1.0
    )
    bernoulli = make_likelihood("bernoulli")
    assert torch.equal(bernoulli.prepare_target(x, noise=False), (x >= 128).float())
    draws = bernoulli.prepare_target(x.repeat(20000, 1, 1, 1), torch.Generator().manual_seed(6))
    assert set(draws.unique().tolist()) <= {0.0, 1.0}
    assert not draws[..., 0].any() and draws[..., 5].all()  # P(1) is exactly 0 at x = 0 and 1 at x = 255
    # dynamic binarization: P(1) = x / 255, standard error <= 0.0036 over 20k draws
    torch.testing.assert_close(draws.mean(0), x[0].float() / 255.0, rtol=0, atol=0.02)


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_every_likelihood_returns_nats_per_image_and_a_mean_in_unit_interval(name):
    likelihood = make_likelihood(name)
    generator = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (3, 2, 4, 4), generator=generator, dtype=torch.uint8)
    params = torch.randn(3, likelihood.param_channels(2), 4, 4, generator=generator)
    log_p = likelihood.log_prob(params, likelihood.prepare_target(x, generator))
    assert log_p.shape == (3,) and torch.isfinite(log_p).all()
    # summed, not averaged: the log-likelihood of two copies of an image side by side is the sum
    doubled = likelihood.log_prob(
        torch.cat([params, params], dim=3), likelihood.prepare_target(torch.cat([x, x], dim=3), noise=False)
    )
    torch.testing.assert_close(
        doubled, 2 * likelihood.log_prob(params, likelihood.prepare_target(x, noise=False))
    )
    mean = likelihood.mean(params)
    assert mean.shape == (3, 2, 4, 4) and mean.min() >= 0 and mean.max() <= 1
    assert likelihood.discrete == (name in ("bernoulli", "categorical_256", "discretized_logistic"))


def test_unknown_likelihood_lists_the_allowed_names():
    with pytest.raises(ValueError, match="model.likelihood") as error:
        make_likelihood("gaussian")
    for name in LIKELIHOODS:
        assert name in str(error.value)
    with pytest.raises(ValueError, match="gaussian_std"):
        make_likelihood("gaussian_fixed", gaussian_std=0.0)


# ---------------------------------------------------------------------------------------------- bits/dim


def test_bits_per_dim_of_a_uniform_categorical_is_eight():
    likelihood = make_likelihood("categorical_256")
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(8), dtype=torch.uint8)
    log_p = likelihood.log_prob(torch.zeros(2, 3 * 256, 4, 4), likelihood.prepare_target(x))
    torch.testing.assert_close(log_p, torch.full((2,), -48 * math.log(256.0)))
    torch.testing.assert_close(bits_per_dim(-log_p, 48, discrete=True), torch.full((2,), 8.0))


def test_bits_per_dim_of_a_unit_density_is_eight():
    """A density of 1 on [0,1)^D assigns each 8-bit value the mass 256^-D: 8 bits/dim after the log 256
    change of scale. The Gaussian N(y; y, 1 / (2 pi)) has density exactly 1 at its mean."""
    assert bits_per_dim(0.0, 1000, discrete=False) == pytest.approx(8.0, abs=1e-12)
    likelihood = make_likelihood("gaussian_fixed", gaussian_std=1.0 / math.sqrt(2 * math.pi))
    x = torch.randint(0, 256, (2, 1, 4, 4), generator=torch.Generator().manual_seed(9), dtype=torch.uint8)
    target = likelihood.prepare_target(x, noise=False)
    log_p = likelihood.log_prob(target, target)
    torch.testing.assert_close(log_p, torch.zeros(2), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        bits_per_dim(-log_p, 16, discrete=False), torch.full((2,), 8.0), rtol=0, atol=1e-6
    )


def test_bits_per_dim_hand_values():
    # discrete: nll / (D ln 2); a fair coin per binary pixel is 1 bit/dim
    assert bits_per_dim(784 * math.log(2.0), 784, discrete=True) == pytest.approx(1.0, abs=1e-12)
    assert bits_per_dim(1000.0, 12288, discrete=True) == pytest.approx(
        1000.0 / (12288 * math.log(2)), rel=1e-12
    )
    # continuous: (nll + D ln 256) / (D ln 2) = nll / (D ln 2) + 8
    assert bits_per_dim(-5000.0, 12288, discrete=False) == pytest.approx(
        -5000.0 / (12288 * math.log(2)) + 8.0, rel=1e-12
    )
    tensor = bits_per_dim(torch.tensor([0.0, 12288 * math.log(2.0)]), 12288, discrete=False)
    torch.testing.assert_close(tensor, torch.tensor([8.0, 9.0]))


def test_discretized_logistic_with_a_sharp_peak_costs_almost_nothing():
    """s = e^-7 centred on the true bin gives P(x) = 2 sigmoid(e^7 / 255) - 1 per subpixel."""
    likelihood = DiscretizedLogistic()
    x = torch.randint(1, 255, (1, 3, 4, 4), generator=torch.Generator().manual_seed(10), dtype=torch.uint8)
    target = likelihood.prepare_target(x)
    params = torch.cat([target, torch.full_like(target, -7.0)], dim=1)
    per_subpixel = math.log(2 * (1 / (1 + math.exp(-math.exp(7) / 255))) - 1)
    torch.testing.assert_close(
        likelihood.log_prob(params, target), torch.tensor([48 * per_subpixel]), rtol=1e-4, atol=1e-6
    )
