"""Decoder likelihoods p(x|z) for 8-bit images.

Every likelihood takes the decoder's raw output ``params`` of shape (B, P, H, W), with
``P = param_channels(C)``, and 8-bit images ``x`` (uint8, (B, C, H, W)), and returns log p(x|z) in **nats per
image** (summed over all pixels and channels, never averaged).

How each maps the 8-bit data (``prepare_target``):

- ``bernoulli``: binarized data. Each subpixel is drawn from Bernoulli(x / 255) (dynamic binarization, the
  convention of the binarized-MNIST literature; drawn as u < x with u uniform on {0, ..., 254}); log p is a
  probability mass over {0, 1}^D. Only meaningful for (near-)binary data such as MNIST.
- ``gaussian_fixed`` / ``gaussian_learned_scalar`` / ``gaussian_learned_pixel``: continuous densities on
  y = (x + u) / 256 in [0, 1), u ~ U(0, 1) (uniform dequantization, Theis et al. 2016; u = 1/2 when no noise
  is wanted). log p is a density on [0,1]^D; :func:`vae.objectives.bits_per_dim` adds D * log 256 to turn it
  into a bound on the discrete 8-bit log-likelihood.
- ``categorical_256``: a 256-way softmax per subpixel (van den Oord et al. 2016); a mass on {0..255}^D.
- ``discretized_logistic``: a logistic per subpixel integrated over the bin of width 2/255 around
  x scaled to [-1, 1], with the edge bins open (Salimans et al. 2017, PixelCNN++, one mixture component);
  a mass on {0..255}^D.

``discrete`` says whether log p is a mass over 8-bit (or binary) values (True) or a density on [0,1) (False).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2.0 * math.pi)
_SUM_DIMS = (1, 2, 3)


def _to_unit_interval(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32) / 255.0


class Likelihood(nn.Module):
    """Interface of p(x|z). Subclasses set ``name`` and ``discrete`` and implement the methods below."""

    name: str = ""
    discrete: bool = True

    def param_channels(self, channels: int) -> int:
        """Decoder output channels needed for ``channels`` image channels."""
        raise NotImplementedError

    def prepare_target(
        self, x: torch.Tensor, generator: torch.Generator | None = None, noise: bool = True
    ) -> torch.Tensor:
        """Map uint8 images (B, C, H, W) to what ``log_prob`` scores (see the module docstring).

        ``noise=False`` gives the deterministic version (bin centres, threshold at 1/2 for Bernoulli).
        """
        raise NotImplementedError

    def log_prob(self, params: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target | z) summed over pixels: (B,) nats per image. ``params``: (B, P, H, W)."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """The expected image under p(x|z) as float in [0, 1], shape (B, C, H, W) (for display)."""
        raise NotImplementedError


class Bernoulli(Likelihood):
    name = "bernoulli"
    discrete = True

    def param_channels(self, channels: int) -> int:
        return channels

    def prepare_target(self, x, generator=None, noise=True):
        if noise:
            # Bernoulli(x / 255) in one pass over bytes: with u uniform on {0, ..., 254}, P(u < x) = x / 255
            # exactly for every x in {0, ..., 255} (4x faster on a CPU than torch.bernoulli on x / 255 as
            # float: benchmarks/RESULTS.md "Peers").
            draws = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
            return torch.lt(draws.random_(0, 255, generator=generator), x).to(torch.float32)
        return (_to_unit_interval(x) >= 0.5).to(torch.float32)

    def log_prob(self, params, target):
        return -F.binary_cross_entropy_with_logits(params.float(), target, reduction="none").sum(
            dim=_SUM_DIMS
        )

    def mean(self, params):
        return torch.sigmoid(params.float())


class _GaussianBase(Likelihood):
    discrete = False

    def prepare_target(self, x, generator=None, noise=True):
        x = x.to(torch.float32)
        u = torch.rand(x.shape, device=x.device, generator=generator) if noise else 0.5
        return (x + u) / 256.0

    @staticmethod
    def _gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = (target - mean) * torch.exp(-log_std)
        return (-0.5 * z.pow(2) - log_std - 0.5 * LOG_2PI).sum(dim=_SUM_DIMS)


class GaussianFixed(_GaussianBase):
    """N(y; mu(z), sigma^2 I) with a fixed sigma: -log p = ||y - mu||^2 / (2 sigma^2) + const (the "MSE"
    form)."""

    name = "gaussian_fixed"

    def __init__(self, std: float = 0.1):
        super().__init__()
        if not std > 0:
            raise ValueError(f"model.gaussian_std: must be > 0, got {std}")
        self.register_buffer("log_std", torch.tensor(math.log(std)))

    def param_channels(self, channels):
        return channels

    def log_prob(self, params, target):
        return self._gaussian_log_prob(params.float(), self.log_std.expand_as(target), target)

    def mean(self, params):
        return params.float().clamp(0.0, 1.0)


class GaussianLearnedScalar(_GaussianBase):
    """N(y; mu(z), sigma^2 I) with one learned sigma shared by all pixels (log sigma clamped to [-7, 2])."""

    name = "gaussian_learned_scalar"

    def __init__(self, initial_std: float = 0.1):
        super().__init__()
        self.log_std = nn.Parameter(torch.tensor(math.log(initial_std)))

    def param_channels(self, channels):
        return channels

    def log_prob(self, params, target):
        log_std = self.log_std.clamp(-7.0, 2.0)
        return self._gaussian_log_prob(params.float(), log_std.expand_as(target), target)

    def mean(self, params):
        return params.float().clamp(0.0, 1.0)


class GaussianLearnedPixel(_GaussianBase):
    """N(y; mu(z), diag(sigma(z)^2)): the decoder outputs a mean and a log sigma per subpixel (clamped to [-7,
    2])."""

    name = "gaussian_learned_pixel"

    def param_channels(self, channels):
        return 2 * channels

    def log_prob(self, params, target):
        mean, log_std = params.float().chunk(2, dim=1)
        return self._gaussian_log_prob(mean, log_std.clamp(-7.0, 2.0), target)

    def mean(self, params):
        return params.float().chunk(2, dim=1)[0].clamp(0.0, 1.0)


class Categorical256(Likelihood):
    """A 256-way categorical (softmax) per subpixel; params laid out as (B, C * 256, H, W), channel-major."""

    name = "categorical_256"
    discrete = True

    def param_channels(self, channels):
        return 256 * channels

    def prepare_target(self, x, generator=None, noise=True):
        return x.to(torch.long)

    def _log_probs(self, params):
        b, p, h, w = params.shape
        return F.log_softmax(params.float().view(b, p // 256, 256, h, w), dim=2)

    def log_prob(self, params, target):
        log_probs = self._log_probs(params)
        return log_probs.gather(2, target.unsqueeze(2)).squeeze(2).sum(dim=_SUM_DIMS)

    def mean(self, params):
        probs = self._log_probs(params).exp()
        values = torch.arange(256, device=params.device, dtype=probs.dtype).view(1, 1, 256, 1, 1)
        return (probs * values).sum(dim=2) / 255.0


class DiscretizedLogistic(Likelihood):
    """Discretized logistic per subpixel (Salimans et al. 2017, eq. 2, one component).

    x in {0..255} is scaled to c = x / 127.5 - 1 in [-1, 1]; P(x) = sigmoid((c + 1/255 - mu) / s) -
    sigmoid((c - 1/255 - mu) / s), with the lower edge at -inf for x = 0 and the upper at +inf for x = 255, so
    the 256 probabilities sum to exactly 1 (to ~1e-7 in float32, for any mu and s). params: (B, 2C, H, W) =
    (mu, log s), log s clamped to [-7, 7] (:data:`LOG_SCALE_RANGE`): below, a bin's mass underflows
    (PixelCNN++ clamps at -7 too); above, 1/s underflows in float32 (at log s >= ~88) and the log-mass of a
    middle bin and its gradient become -inf/NaN. Outside the range the gradient of log s is zero. ``target``
    must lie on the grid of :meth:`prepare_target` (it is rounded to the nearest of the 256 levels).
    """

    LOG_SCALE_RANGE = (-7.0, 7.0)

    name = "discretized_logistic"
    discrete = True

    def param_channels(self, channels):
        return 2 * channels

    def prepare_target(self, x, generator=None, noise=True):
        return x.to(torch.float32) / 127.5 - 1.0

    def log_prob(self, params, target):
        mean, log_scale = params.float().chunk(2, dim=1)
        inv_scale = torch.exp(-log_scale.clamp(*self.LOG_SCALE_RANGE))
        # Bin edges from the integer level, so that the upper edge of bin x and the lower edge of bin x + 1
        # are the same float: the 256 masses then telescope to 1 up to rounding (~1e-7) even for tiny scales,
        # where edges computed as target +- 1/255 disagree by an ulp and the sum drifts by ~1e-5.
        level = torch.round((target + 1.0) * 127.5)
        upper = (2.0 * level - 254.0) / 255.0
        lower = (2.0 * level - 256.0) / 255.0
        plus_in = inv_scale * (upper - mean)
        min_in = inv_scale * (lower - mean)
        log_cdf_plus = F.logsigmoid(plus_in)  # log P(X <= upper edge), used for x = 0
        log_one_minus_cdf_min = -F.softplus(min_in)  # log P(X > lower edge), used for x = 255
        # Middle bins: sigmoid(a) - sigmoid(b) = sigmoid(a) * sigmoid(-b) * (1 - exp(b - a)), in log space:
        # exact and stable in float32 for any mean and scale (no cancellation of two CDFs near 1, no underflow
        # fallback), and finite everywhere so torch.where passes no NaN gradients.
        log_mid = log_cdf_plus + log_one_minus_cdf_min + torch.log(-torch.expm1(-inv_scale * (upper - lower)))
        log_probs = torch.where(
            level < 0.5, log_cdf_plus, torch.where(level > 254.5, log_one_minus_cdf_min, log_mid)
        )
        return log_probs.sum(dim=_SUM_DIMS)

    def mean(self, params):
        mean = params.float().chunk(2, dim=1)[0]
        return ((mean + 1.0) / 2.0).clamp(0.0, 1.0)


LIKELIHOODS: dict[str, type[Likelihood]] = {
    cls.name: cls
    for cls in (
        Bernoulli,
        GaussianFixed,
        GaussianLearnedScalar,
        GaussianLearnedPixel,
        Categorical256,
        DiscretizedLogistic,
    )
}


def make_likelihood(name: str, gaussian_std: float = 0.1) -> Likelihood:
    """Build a likelihood by name. Raises ValueError listing the allowed names for an unknown one."""
    if name not in LIKELIHOODS:
        raise ValueError(f"model.likelihood: unknown likelihood {name!r}; allowed: {', '.join(LIKELIHOODS)}")
    if name == "gaussian_fixed":
        return GaussianFixed(gaussian_std)
    if name == "gaussian_learned_scalar":
        return GaussianLearnedScalar(gaussian_std)
    return LIKELIHOODS[name]()
