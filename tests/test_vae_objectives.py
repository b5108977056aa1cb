"""The ELBO, the importance-weighted bound and the importance-sampled log p(x) on probabilistic PCA, where
everything is known in closed form.

The model (Tipping & Bishop 1999): z ~ N(0, I_3), y = W z + b + sigma * eps, so p(y) = N(y; b, W W^T + sigma^2
I) and p(z | y) = N(M^-1 W^T (y - b), sigma^2 M^-1) with M = W^T W + sigma^2 I. It is a real ``vae.VAE``:
architecture "mlp" with hidden_dims=[] (encoder Flatten -> Linear, decoder one Linear) and the fixed-variance
Gaussian likelihood, with weights set by hand. W has orthogonal columns, so M and the exact posterior are
diagonal and a diagonal-Gaussian encoder can represent it. The encoder sees e = x / 127.5 - 1 and the
likelihood scores y = (x + 1/2) / 256 = e * 127.5 / 256 + 1/2, an affine map of e, so the linear encoder can
output the exact posterior mean; its log-variance is a constant bias. References are computed in float64; the
model runs in float32.

Tolerances. With the exact posterior every importance weight equals p(y): checked to 1e-4 nats per image
(float32 rounding of terms of size ~40 nats; observed 1.3e-5). With q = the exact posterior with each variance
multiplied by a = 2, the normalised weights w / p(y) have mean 1 and E[(w/p)^2] = (a / sqrt(2a - 1))^D =
1.5396 for D = 3 (a Gaussian integral), i.e. relative variance rho = 0.5396, so the K-sample estimate log p_K
has standard error sqrt(rho / K) (0.0104 nats at K = 5000) and bias -rho / (2K) (delta method). The tests
allow 5 standard errors (5.2e-2 nats per image at K = 5000, 6.5e-3 for the mean over 64 images) and check that
the observed RMS error follows sqrt(rho / K).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from vae.model import VAE
from vae.objectives import bits_per_dim, importance_sampled_log_likelihood, iwae_bound, log_importance_weights

IMAGE_SHAPE = (1, 4, 4)
DATA_DIM = 16
LATENT_DIM = 3
SIGMA = 0.05
VARIANCE_INFLATION = 2.0
RHO = (
    VARIANCE_INFLATION / math.sqrt(2 * VARIANCE_INFLATION - 1)
) ** LATENT_DIM - 1.0  # relative variance of w


class PPCA:
    """A vae.VAE wired as probabilistic PCA, plus float64 closed forms."""

    def __init__(self, variance_inflation: float = 1.0, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(DATA_DIM, LATENT_DIM, generator=generator, dtype=torch.float64))
        self.W = q * torch.tensor([0.25, 0.15, 0.08], dtype=torch.float64)  # orthogonal columns
        self.b = 0.5 + 0.05 * torch.randn(DATA_DIM, generator=generator, dtype=torch.float64)
        m_diag = (self.W * self.W).sum(0) + SIGMA**2  # M = W^T W + sigma^2 I is diagonal
        self.A = self.W.T / m_diag.unsqueeze(1)  # M^-1 W^T, (3, 16)
        self.posterior_variance = SIGMA**2 / m_diag  # (3,)
        self.q_variance = variance_inflation * self.posterior_variance
        self.marginal = MultivariateNormal(
            self.b, self.W @ self.W.T + SIGMA**2 * torch.eye(DATA_DIM, dtype=torch.float64)
        )

        self.model = VAE(
            "mlp",
            IMAGE_SHAPE,
            latent_dim=LATENT_DIM,
            hidden_dims=[],
            likelihood="gaussian_fixed",
            gaussian_std=SIGMA,
        )
        encoder = [m for m in self.model.encoder.modules() if isinstance(m, torch.nn.Linear)]
        decoder = [m for m in self.model.decoder.modules() if isinstance(m, torch.nn.Linear)]
        assert len(encoder) == 1 and len(decoder) == 1, "hidden_dims=[] must give a single Linear each way"
        alpha, beta = 127.5 / 256.0, 128.0 / 256.0  # y = alpha * e + beta
        with torch.no_grad():
            decoder[0].weight.copy_(self.W)
            decoder[0].bias.copy_(self.b)
            weight = torch.zeros(2 * LATENT_DIM, DATA_DIM, dtype=torch.float64)
            bias = torch.zeros(2 * LATENT_DIM, dtype=torch.float64)
            weight[:LATENT_DIM] = alpha * self.A
            bias[:LATENT_DIM] = self.A @ (beta - self.b)
            bias[LATENT_DIM:] = self.q_variance.log()
            encoder[0].weight.copy_(weight)
            encoder[0].bias.copy_(bias)
        self.model.eval()

    def data(self, num_images: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x uint8 (B, 1, 4, 4), y float32 target = (x + 1/2) / 256) drawn from the model."""
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn(num_images, LATENT_DIM, generator=generator, dtype=torch.float64)
        y = (
            z @ self.W.T
            + self.b
            + SIGMA * torch.randn(num_images, DATA_DIM, generator=generator, dtype=torch.float64)
        )
        x = (y * 256).floor().clamp(0, 255).to(torch.uint8).view(num_images, *IMAGE_SHAPE)
        return x, self.model.likelihood.prepare_target(x, noise=False)

    def log_marginal(self, target: torch.Tensor) -> torch.Tensor:
        """Exact log p(y) in nats per image, float64 (B,)."""
        return self.marginal.log_prob(target.double().view(target.shape[0], -1))

    def exact_elbo(self, target: torch.Tensor) -> torch.Tensor:
        """E_q[log p(y|z)] - KL(q || p(z)) in closed form for q = N(A (y - b), diag(q_variance)), float64
        (B,)."""
        y = target.double().view(target.shape[0], -1)
        mean = (y - self.b) @ self.A.T
        residual = y - mean @ self.W.T - self.b
        trace = (self.W.pow(2) * self.q_variance).sum()  # tr(W diag(v) W^T)
        expected_log_lik = -0.5 * DATA_DIM * math.log(2 * math.pi * SIGMA**2) - (
            residual.pow(2).sum(1) + trace
        ) / (2 * SIGMA**2)
        return expected_log_lik - self.exact_kl(target)

    def exact_kl(self, target: torch.Tensor) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) in closed form, float64 (B,)."""
        mean = (target.double().view(target.shape[0], -1) - self.b) @ self.A.T
        return 0.5 * (mean.pow(2) + self.q_variance - 1 - self.q_variance.log()).sum(1)


def _model_elbo(ppca: PPCA, x: torch.Tensor, target: torch.Tensor, num_samples: int, seed: int):
    """The model's Monte-Carlo ELBO -(reconstruction + KL) with L = num_samples, and its standard error per
    image (the spread of log p(x|z) under q, from an independent set of L samples, over sqrt(L))."""
    with torch.no_grad():
        terms = ppca.model.elbo_terms(
            x, num_samples=num_samples, generator=torch.Generator().manual_seed(seed), target=target
        )
        z = terms.posterior.rsample(num_samples, torch.Generator().manual_seed(seed + 1))
        log_lik = ppca.model.likelihood.log_prob(
            ppca.model.decode(z.view(-1, LATENT_DIM)), target.repeat(num_samples, 1, 1, 1)
        ).view(num_samples, -1)
    return terms, -terms.negative_elbo(beta=1.0).double(), log_lik.double().std(0) / math.sqrt(num_samples)


def test_the_model_is_probabilistic_pca():
    ppca = PPCA()
    x, target = ppca.data(8)
    posterior = ppca.model.encode(x)
    y = target.double().view(8, -1)
    torch.testing.assert_close(posterior.mean.double(), (y - ppca.b) @ ppca.A.T, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        posterior.log_variance.double(), ppca.posterior_variance.log().expand(8, -1), rtol=0, atol=1e-6
    )
    z = torch.randn(5, LATENT_DIM)
    torch.testing.assert_close(
        ppca.model.decode(z).double().view(5, -1), z.double() @ ppca.W.T + ppca.b, rtol=0, atol=1e-6
    )


def test_closed_form_references_agree():
    """Sanity of the float64 references: log p(y) - ELBO = KL(q || p(z|y)), which is 0 for the exact
    posterior and D/2 (a - 1 - log a) when every posterior variance is multiplied by a."""
    _, target = PPCA().data(16)
    exact, inflated = PPCA(), PPCA(VARIANCE_INFLATION)
    torch.testing.assert_close(exact.exact_elbo(target), exact.log_marginal(target), rtol=0, atol=1e-9)
    gap = LATENT_DIM / 2 * (VARIANCE_INFLATION - 1 - math.log(VARIANCE_INFLATION))
    torch.testing.assert_close(
        inflated.log_marginal(target) - inflated.exact_elbo(target),
        torch.full((16,), gap, dtype=torch.float64),
        rtol=0,
        atol=1e-9,
    )


@pytest.mark.parametrize("num_samples", [1, 7, 300])
def test_exact_posterior_gives_constant_weights_equal_to_log_p(num_samples):
    """q(z|x) = p(z|x) makes w = p(x|z) p(z) / p(z|x) = p(x) for every z: the estimate is exact for any K."""
    ppca = PPCA()
    x, target = ppca.data(32)
    exact = ppca.log_marginal(target).float()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        log_w = log_importance_weights(ppca.model, x, target, num_samples, generator=generator)
    assert log_w.shape == (num_samples, 32)
    torch.testing.assert_close(log_w, exact.expand(num_samples, -1), rtol=0, atol=1e-4)
    estimate = importance_sampled_log_likelihood(
        ppca.model, x, num_samples, chunk_size=4, target=target, generator=generator
    )
    torch.testing.assert_close(estimate, exact, rtol=0, atol=1e-4)
    with torch.no_grad():
        bound = iwae_bound(ppca.model, x, num_samples, target=target, generator=generator)
    torch.testing.assert_close(bound, exact, rtol=0, atol=1e-4)


def test_exact_posterior_makes_the_elbo_tight():
    """ELBO = log p(x) when q is the exact posterior; the model's Monte-Carlo ELBO (L = 4000) matches it
    within
    5 standard errors of the reconstruction term."""
    ppca = PPCA()
    x, target = ppca.data(8)
    terms, elbo, standard_error = _model_elbo(ppca, x, target, 4000, seed=3)
    assert ((elbo - ppca.log_marginal(target)).abs() < 5 * standard_error + 1e-4).all()
    torch.testing.assert_close(terms.kl.double(), ppca.exact_kl(target), rtol=1e-5, atol=1e-5)
    assert terms.kl_per_dim.shape == (8, LATENT_DIM)


def test_importance_sampled_estimate_converges_to_log_p():
    """q = exact posterior mean with doubled variances: the estimate's error shrinks like sqrt(rho / K); at
    K = 5000 every image is within 5 standard errors (0.052 nats) and the mean error within 0.0065 nats."""
    ppca = PPCA(VARIANCE_INFLATION)
    x, target = ppca.data(64)
    exact = ppca.log_marginal(target)
    rms_errors = {}
    for seed, num_samples in enumerate([10, 100, 1000, 5000]):
        estimate = importance_sampled_log_likelihood(
            ppca.model,
            x,
            num_samples,
            chunk_size=1000,
            target=target,
            generator=torch.Generator().manual_seed(10 + seed),
        )
        assert estimate.shape == (64,)
        error = estimate.double() - exact
        rms_errors[num_samples] = error.pow(2).mean().sqrt().item()
        if num_samples >= 100:  # delta-method standard error; the RMS over 64 images is within ~20% of it
            assert rms_errors[num_samples] < 1.5 * math.sqrt(RHO / num_samples)
    standard_error = math.sqrt(RHO / 5000)
    assert error.abs().max() < 5 * standard_error
    assert abs(error.mean().item()) < 5 * standard_error / math.sqrt(64)
    assert rms_errors[10] > rms_errors[100] > rms_errors[1000] > rms_errors[5000]
    assert rms_errors[100] / rms_errors[5000] > 3.0  # sqrt(50) = 7.1 in expectation


def test_elbo_below_iwae_below_log_p_and_iwae_increases_with_k():
    """Burda et al. 2016, theorem 1: ELBO = L_1 <= L_K <= L_{K'} <= log p(x) for K <= K', in expectation.
    Expectations are averages over 64 images x 100 independent replicates; consecutive gaps (about 0.46,
    0.08, 0.018 and 0.004 nats for K = 1, 4, 16, 64) exceed 3 standard errors of the averages (<= 0.0012 for
    K = 64, from the replicates themselves)."""
    ppca = PPCA(VARIANCE_INFLATION)
    x, target = ppca.data(64)
    replicates = 100
    x_rep, target_rep = x.repeat(replicates, 1, 1, 1), target.repeat(replicates, 1, 1, 1)
    exact = ppca.log_marginal(target).repeat(replicates)
    gaps, standard_errors = {}, {}
    with torch.no_grad():
        for seed, num_samples in enumerate([1, 4, 16, 64]):
            bound = iwae_bound(
                ppca.model,
                x_rep,
                num_samples,
                target=target_rep,
                generator=torch.Generator().manual_seed(20 + seed),
            ).double()
            gap = exact - bound
            gaps[num_samples] = gap.mean().item()
            standard_errors[num_samples] = gap.std().item() / math.sqrt(gap.numel())
    elbo_gap = LATENT_DIM / 2 * (VARIANCE_INFLATION - 1 - math.log(VARIANCE_INFLATION))  # KL(q || p(z|x))
    assert abs(gaps[1] - elbo_gap) < 5 * standard_errors[1]  # L_1 is the ELBO
    for small, large in [(1, 4), (4, 16), (16, 64)]:
        assert gaps[small] - gaps[large] > 3 * (standard_errors[small] + standard_errors[large]), gaps
    assert gaps[64] > 0  # L_64 <= log p(x)
    assert gaps[64] < 2 * RHO / (2 * 64)  # and close to it: bias ~ rho / (2K)
    # the model's own ELBO (L = 2000) agrees with the closed form within 5 standard errors of the 64-image
    # mean
    _, elbo, standard_error = _model_elbo(ppca, x, target, 2000, seed=30)
    mean_error = (elbo - ppca.exact_elbo(target)).mean().abs()
    assert mean_error < 5 * standard_error.pow(2).mean().sqrt() / math.sqrt(64)


def test_chunked_estimate_is_the_log_mean_of_all_weights():
    """K = 10 in chunks of 4, 4, 2 equals log((1/10) sum_k w_k) over the same ten draws."""
    ppca = PPCA(VARIANCE_INFLATION)
    x, target = ppca.data(5)
    estimate = importance_sampled_log_likelihood(
        ppca.model, x, 10, chunk_size=4, target=target, generator=torch.Generator().manual_seed(5)
    )
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        posterior = ppca.model.encode(x)
        log_w = torch.cat(
            [log_importance_weights(ppca.model, x, target, k, posterior, generator) for k in (4, 4, 2)]
        )
    torch.testing.assert_close(estimate, torch.logsumexp(log_w, 0) - math.log(10), rtol=0, atol=1e-5)
    assert log_w.std(0).min() > 0.1  # the weights really vary here


def test_importance_sampling_rejects_bad_sample_counts():
    ppca = PPCA()
    x, _ = ppca.data(2)
    for num_samples, chunk_size in [(0, 10), (10, 0)]:
        with pytest.raises(ValueError, match="num_samples and chunk_size"):
            importance_sampled_log_likelihood(ppca.model, x, num_samples, chunk_size)


def test_iwae_bound_is_differentiable_through_the_encoder():
    ppca = PPCA(VARIANCE_INFLATION)
    ppca.model.train()
    x, target = ppca.data(4)
    iwae_bound(ppca.model, x, 8, target=target, generator=torch.Generator().manual_seed(6)).sum().backward()
    encoder_grad = [p.grad for p in ppca.model.encoder.parameters()]
    assert all(g is not None for g in encoder_grad) and sum(g.abs().sum() for g in encoder_grad) > 0


def test_bits_per_dim_of_the_gaussian_estimate():
    """A continuous density on [0,1)^16: bits/dim = (-log p(y) + 16 log 256) / (16 log 2), by hand."""
    ppca = PPCA()
    x, target = ppca.data(4)
    log_p = importance_sampled_log_likelihood(ppca.model, x, 10, target=target)
    by_hand = (-ppca.log_marginal(target) / (DATA_DIM * math.log(2)) + 8.0).float()
    torch.testing.assert_close(
        bits_per_dim(-log_p, ppca.model.num_dims, ppca.model.likelihood.discrete), by_hand, rtol=0, atol=1e-4
    )
