"""KL-weight (beta) schedules: pure functions of the optimisation step.

Every schedule is a small frozen dataclass whose fields are validated on construction (``ValueError`` naming
the field) and whose ``name`` field selects it from a config. The same classes are validated by pydantic when
they appear in ``params.yaml`` (pydantic reads stdlib dataclasses and runs ``__post_init__``), so there is one
definition of each schedule for the library and the pipeline.

The training objective built from a schedule is (per image, in nats)

    loss = reconstruction + kl_penalty(KL, step)

with ``kl_penalty = beta(step) * KL`` for every schedule but capacity annealing, whose penalty is
``gamma * |KL - C(step)|`` (Burgess et al. 2018). ``beta(step)`` is what gets logged as ``beta``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Union

if TYPE_CHECKING:
    import torch

# pydantic reads this attribute on stdlib dataclasses; a plain dict keeps vae/ free of a pydantic import.
_STRICT = {"extra": "forbid"}


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ValueError(f"beta_schedule.{field}: {message}")


def _real(value) -> bool:
    """A real number (not a bool), so that a string or None fails with the field's ValueError, not a
    TypeError."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _non_negative(schedule, field: str, positive: bool = False) -> None:
    """``schedule.<field>`` is a finite real number >= 0 (> 0 with ``positive``)."""
    value = getattr(schedule, field)
    ok = _real(value) and math.isfinite(value) and (value > 0 if positive else value >= 0)
    _require(ok, field, f"must be a finite number {'>' if positive else '>='} 0, got {value}")


def _count(schedule, field: str, minimum: int) -> None:
    """``schedule.<field>`` is an integer >= ``minimum``."""
    value = getattr(schedule, field)
    _require(_integer(value) and value >= minimum, field, f"must be an integer >= {minimum}, got {value}")


@dataclass(frozen=True)
class ConstantBeta:
    """beta(step) = beta for all steps: the beta-VAE (Higgins et al. 2017); beta = 1 is the plain ELBO."""

    __pydantic_config__ = _STRICT
    name: Literal["constant"] = "constant"
    beta: float = 1.0

    def __post_init__(self) -> None:
        _non_negative(self, "beta")

    def beta_at(self, step: int) -> float:
        return float(self.beta)


@dataclass(frozen=True)
class LinearWarmup:
    """KL annealing (Bowman et al. 2016): beta rises linearly from 0 at ``start_step`` to ``beta_max`` at
    ``start_step + warmup_steps`` and stays there."""

    __pydantic_config__ = _STRICT
    name: Literal["linear"] = "linear"
    beta_max: float = 1.0
    warmup_steps: int = 5_000
    start_step: int = 0

    def __post_init__(self) -> None:
        _non_negative(self, "beta_max")
        _count(self, "warmup_steps", 1)
        _count(self, "start_step", 0)

    def beta_at(self, step: int) -> float:
        progress = (step - self.start_step) / self.warmup_steps
        return self.beta_max * min(1.0, max(0.0, progress))


@dataclass(frozen=True)
class CyclicalBeta:
    """Cyclical annealing (Fu et al. 2019, NAACL): ``total_steps`` is split into ``num_cycles`` equal cycles;
    within each, beta rises linearly from 0 to ``beta_max`` over the first ``ratio`` of the cycle, then holds
    ``beta_max``. After ``total_steps`` beta stays at ``beta_max``.

    ``total_steps = None`` means "the run's total number of steps"; the pipeline fills it in with
    :meth:`with_total_steps` before training (``beta_at`` raises ``ValueError`` while it is unset).
    """

    __pydantic_config__ = _STRICT
    name: Literal["cyclical"] = "cyclical"
    beta_max: float = 1.0
    num_cycles: int = 4
    ratio: float = 0.5
    total_steps: int | None = None

    def __post_init__(self) -> None:
        _non_negative(self, "beta_max")
        _count(self, "num_cycles", 1)
        _require(_real(self.ratio) and 0 < self.ratio <= 1, "ratio", f"must be in (0, 1], got {self.ratio}")
        _require(
            self.total_steps is None or (_integer(self.total_steps) and self.total_steps >= self.num_cycles),
            "total_steps",
            f"must be an integer >= num_cycles ({self.num_cycles}) "
            f"or null for the run's length, got {self.total_steps}",
        )

    def with_total_steps(self, total_steps: int) -> CyclicalBeta:
        if self.total_steps is not None:
            return self
        return CyclicalBeta(
            self.name, self.beta_max, self.num_cycles, self.ratio, max(total_steps, self.num_cycles)
        )

    def beta_at(self, step: int) -> float:
        if self.total_steps is None:
            raise ValueError("beta_schedule.total_steps: unset; call with_total_steps(run_length) first")
        if step >= self.total_steps:
            return float(self.beta_max)
        period = self.total_steps / self.num_cycles
        position = (step % period) / period  # in [0, 1)
        return self.beta_max * min(1.0, position / self.ratio)


@dataclass(frozen=True)
class SigmoidBeta:
    """Logistic annealing (Bowman et al. 2016): beta(step) = beta_max / (1 + exp(-steepness * (step -
    midpoint_step)))."""

    __pydantic_config__ = _STRICT
    name: Literal["sigmoid"] = "sigmoid"
    beta_max: float = 1.0
    midpoint_step: int = 5_000
    steepness: float = 0.002

    def __post_init__(self) -> None:
        _non_negative(self, "beta_max")
        _count(self, "midpoint_step", 0)
        _non_negative(self, "steepness", positive=True)

    def beta_at(self, step: int) -> float:
        x = -self.steepness * (step - self.midpoint_step)
        if x > 700:  # exp overflow; beta is 0 to double precision
            return 0.0
        return self.beta_max / (1.0 + math.exp(x))


@dataclass(frozen=True)
class CapacityAnnealing:
    """Controlled capacity increase (Burgess et al. 2018, "Understanding disentangling in beta-VAE"):
    penalty = gamma * |KL - C(step)| with C rising linearly from 0 to ``capacity_max`` nats over
    ``capacity_steps`` steps. ``beta_at`` returns ``gamma`` (the weight on the KL deviation)."""

    __pydantic_config__ = _STRICT
    name: Literal["capacity"] = "capacity"
    gamma: float = 1000.0
    capacity_max: float = 25.0
    capacity_steps: int = 100_000

    def __post_init__(self) -> None:
        _non_negative(self, "gamma")
        _non_negative(self, "capacity_max")
        _count(self, "capacity_steps", 1)

    def capacity_at(self, step: int) -> float:
        """C(step) in nats per image."""
        return self.capacity_max * min(1.0, max(0.0, step / self.capacity_steps))

    def beta_at(self, step: int) -> float:
        return float(self.gamma)


BetaSchedule = Union[ConstantBeta, LinearWarmup, CyclicalBeta, SigmoidBeta, CapacityAnnealing]  # noqa: UP007
SCHEDULES: dict[str, type] = {
    "constant": ConstantBeta,
    "linear": LinearWarmup,
    "cyclical": CyclicalBeta,
    "sigmoid": SigmoidBeta,
    "capacity": CapacityAnnealing,
}


def make_schedule(
    config: dict,
) -> ConstantBeta | LinearWarmup | CyclicalBeta | SigmoidBeta | CapacityAnnealing:
    """Build a schedule from a mapping such as ``{"name": "cyclical", "num_cycles": 4}``.

    Raises:
        ValueError: unknown ``name`` (the message lists the allowed names), an unknown field, or an invalid
        value
            (the message names the field).
    """
    config = dict(config)
    name = config.pop("name", None)
    if name not in SCHEDULES:
        raise ValueError(f"beta_schedule.name: unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    cls = SCHEDULES[name]
    allowed = set(cls.__dataclass_fields__) - {"name"}
    unknown = set(config) - allowed
    if unknown:
        raise ValueError(
            f"beta_schedule: unknown field(s) {sorted(unknown)} "
            f"for schedule {name!r}; allowed: {sorted(allowed)}"
        )
    return cls(name=name, **config)


def kl_penalty(
    schedule, kl_per_image: torch.Tensor, step: int, batch_mean_kl: torch.Tensor | None = None
) -> torch.Tensor:
    """The KL part of the loss, averaged over the batch.

    Args:
        schedule: one of the schedule classes above.
        kl_per_image: (B,) KL(q(z|x) || p(z)) in nats per image.
        step: the optimisation step (0-based).
        batch_mean_kl: the mean KL of the whole (global) batch, without gradient, when ``kl_per_image`` is one
            data-parallel rank's part of it (the all-reduced mean); None: the mean of ``kl_per_image``.
    Returns:
        scalar tensor in nats per image: ``beta * mean(KL)``, or ``gamma * |mean(KL) - C|`` for capacity
        annealing (Burgess et al. 2018 apply the absolute value to the batch-mean KL). With ``batch_mean_kl``
        the capacity penalty takes the global mean's value and sign, and its gradient flows through this
        rank's mean: averaged over the ranks (as DDP does) it is the gradient of the global-batch objective.
    """
    kl = kl_per_image.mean()
    if isinstance(schedule, CapacityAnnealing):
        if batch_mean_kl is not None:
            kl = kl + (batch_mean_kl - kl).detach()
        return schedule.gamma * (kl - schedule.capacity_at(step)).abs()
    return schedule.beta_at(step) * kl
