"""Beta schedules: documented values at chosen steps (exact, in double precision), validation errors that name
the field, make_schedule and kl_penalty."""

from __future__ import annotations

import math

import pytest
import torch

from vae.schedules import (
    SCHEDULES,
    CapacityAnnealing,
    ConstantBeta,
    CyclicalBeta,
    LinearWarmup,
    SigmoidBeta,
    kl_penalty,
    make_schedule,
)


def test_constant_beta():
    schedule = ConstantBeta(beta=4.0)
    assert [schedule.beta_at(step) for step in (0, 1, 10**9)] == [4.0, 4.0, 4.0]
    assert ConstantBeta().beta_at(123) == 1.0  # the plain ELBO by default
    assert ConstantBeta(beta=0.0).beta_at(5) == 0.0


def test_linear_warmup_from_zero():
    schedule = LinearWarmup(beta_max=2.0, warmup_steps=100)
    assert schedule.beta_at(0) == 0.0
    assert schedule.beta_at(25) == pytest.approx(0.5, abs=1e-15)
    assert schedule.beta_at(50) == pytest.approx(1.0, abs=1e-15)
    assert schedule.beta_at(100) == 2.0
    assert schedule.beta_at(10**6) == 2.0


def test_linear_warmup_with_start_step():
    schedule = LinearWarmup(beta_max=1.0, warmup_steps=10, start_step=20)
    assert [schedule.beta_at(step) for step in (0, 19, 20)] == [0.0, 0.0, 0.0]
    assert schedule.beta_at(21) == pytest.approx(0.1, abs=1e-15)
    assert schedule.beta_at(25) == pytest.approx(0.5, abs=1e-15)
    assert schedule.beta_at(30) == 1.0
    assert schedule.beta_at(31) == 1.0


def test_cyclical_at_cycle_boundaries_and_ratio_points():
    """Fu et al. 2019: T = 1000 steps in M = 4 cycles of 250; beta rises linearly over the first R = 0.5 of
    each cycle (125 steps) from 0 to beta_max, then holds; beta_max after T."""
    schedule = CyclicalBeta(beta_max=1.0, num_cycles=4, ratio=0.5, total_steps=1000)
    for cycle in range(4):
        start = 250 * cycle
        assert schedule.beta_at(start) == 0.0  # each cycle restarts at 0
        assert schedule.beta_at(start + 25) == pytest.approx(0.2, abs=1e-15)
        assert schedule.beta_at(start + 62.5) == pytest.approx(0.5, abs=1e-15)
        assert schedule.beta_at(start + 125) == 1.0  # the ratio point
        assert schedule.beta_at(start + 200) == 1.0
        assert schedule.beta_at(start + 249) == 1.0
    assert schedule.beta_at(1000) == 1.0
    assert schedule.beta_at(5000) == 1.0


def test_cyclical_ratio_one_and_beta_max():
    schedule = CyclicalBeta(beta_max=3.0, num_cycles=2, ratio=1.0, total_steps=10)
    assert [schedule.beta_at(step) for step in range(10)] == pytest.approx(
        [0, 0.6, 1.2, 1.8, 2.4] * 2, abs=1e-12
    )
    assert schedule.beta_at(10) == 3.0


def test_cyclical_total_steps_filled_in_from_the_run():
    unset = CyclicalBeta(num_cycles=4)
    with pytest.raises(ValueError, match="total_steps"):
        unset.beta_at(0)
    filled = unset.with_total_steps(400)
    assert filled.total_steps == 400 and filled.beta_at(50) == 1.0 and filled.beta_at(100) == 0.0
    assert filled.with_total_steps(10) is filled  # an explicit value is kept
    assert unset.with_total_steps(2).total_steps == 4  # at least one step per cycle


def test_sigmoid_midpoint_and_tails():
    schedule = SigmoidBeta(beta_max=2.0, midpoint_step=1000, steepness=0.01)
    assert schedule.beta_at(1000) == 1.0  # beta_max / 2 exactly
    assert schedule.beta_at(1100) == pytest.approx(2.0 / (1.0 + math.exp(-1.0)), rel=1e-15)
    assert schedule.beta_at(900) == pytest.approx(2.0 / (1.0 + math.e), rel=1e-15)
    assert schedule.beta_at(900) + schedule.beta_at(1100) == pytest.approx(2.0, rel=1e-15)  # point symmetry
    assert schedule.beta_at(0) == pytest.approx(2.0 / (1.0 + math.exp(10.0)), rel=1e-15)
    assert schedule.beta_at(10**9) == 2.0
    assert SigmoidBeta(midpoint_step=10**7, steepness=1.0).beta_at(0) == 0.0  # no overflow


def test_capacity_annealing():
    """Burgess et al. 2018: C(step) rises linearly from 0 to capacity_max over capacity_steps; the penalty is
    gamma * |KL - C|."""
    schedule = CapacityAnnealing(gamma=100.0, capacity_max=20.0, capacity_steps=1000)
    assert schedule.capacity_at(0) == 0.0
    assert schedule.capacity_at(250) == 5.0
    assert schedule.capacity_at(1000) == 20.0
    assert schedule.capacity_at(5000) == 20.0
    assert schedule.beta_at(7) == 100.0
    kl = torch.tensor([3.0, 9.0], dtype=torch.float64)  # batch mean 6
    assert kl_penalty(schedule, kl, 250).item() == pytest.approx(100.0 * 1.0)  # |6 - 5|
    assert kl_penalty(schedule, kl, 500).item() == pytest.approx(100.0 * 4.0)  # |6 - 10|
    assert kl_penalty(schedule, kl, 0).item() == pytest.approx(600.0)
    kl = torch.tensor([3.0, 9.0], requires_grad=True)
    kl_penalty(schedule, kl, 500).backward()  # d/dKL_i of gamma * |mean - C| with mean < C: -gamma / B
    torch.testing.assert_close(kl.grad, torch.tensor([-50.0, -50.0]))


def test_capacity_penalty_on_the_global_batch_mean():
    """Under data parallelism each rank passes the all-reduced batch mean: the penalty takes its value and
    sign, and the gradient flows through the rank's own KLs, so the ranks' averaged gradient is the global
    one."""
    schedule = CapacityAnnealing(gamma=10.0, capacity_max=5.0, capacity_steps=1)
    kl = torch.tensor([3.0, 4.0], requires_grad=True)  # this rank: mean 3.5 < C = 5
    penalty = kl_penalty(schedule, kl, 1, batch_mean_kl=torch.tensor(7.0))  # the global mean 7 > C
    assert penalty.item() == pytest.approx(10.0 * 2.0)
    penalty.backward()
    torch.testing.assert_close(kl.grad, torch.tensor([5.0, 5.0]))  # + gamma / B: the global sign
    beta = kl_penalty(ConstantBeta(beta=0.5), torch.tensor([1.0, 2.0]), 0, batch_mean_kl=torch.tensor(9.0))
    assert beta.item() == pytest.approx(0.75)  # linear in the batch: the local mean is exact


def test_kl_penalty_is_beta_times_the_batch_mean():
    kl = torch.tensor([1.0, 2.0, 6.0])
    assert kl_penalty(ConstantBeta(beta=0.5), kl, 0).item() == pytest.approx(1.5)
    assert kl_penalty(LinearWarmup(beta_max=1.0, warmup_steps=10), kl, 5).item() == pytest.approx(1.5)
    assert kl_penalty(LinearWarmup(beta_max=1.0, warmup_steps=10), kl, 0).item() == 0.0


# ---------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "config, field",
    [
        ({"name": "constant", "beta": -1.0}, "beta_schedule.beta"),
        ({"name": "constant", "beta": math.inf}, "beta_schedule.beta"),
        ({"name": "constant", "beta": math.nan}, "beta_schedule.beta"),
        ({"name": "constant", "beta": "one"}, "beta_schedule.beta"),
        ({"name": "linear", "beta_max": -0.1}, "beta_schedule.beta_max"),
        ({"name": "linear", "warmup_steps": 0}, "beta_schedule.warmup_steps"),
        ({"name": "linear", "warmup_steps": None}, "beta_schedule.warmup_steps"),
        ({"name": "linear", "start_step": -1}, "beta_schedule.start_step"),
        ({"name": "cyclical", "num_cycles": 0}, "beta_schedule.num_cycles"),
        ({"name": "cyclical", "ratio": 1.5}, "beta_schedule.ratio"),
        ({"name": "cyclical", "ratio": 0.0}, "beta_schedule.ratio"),
        ({"name": "cyclical", "num_cycles": 4, "total_steps": 3}, "beta_schedule.total_steps"),
        ({"name": "sigmoid", "steepness": 0.0}, "beta_schedule.steepness"),
        ({"name": "sigmoid", "midpoint_step": -5}, "beta_schedule.midpoint_step"),
        ({"name": "capacity", "gamma": -1.0}, "beta_schedule.gamma"),
        ({"name": "capacity", "capacity_max": -1.0}, "beta_schedule.capacity_max"),
        ({"name": "capacity", "capacity_steps": 0}, "beta_schedule.capacity_steps"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(config, field):
    with pytest.raises(ValueError) as error:
        make_schedule(config)
    assert str(error.value).startswith(field + ":"), str(error.value)


def test_unknown_field_is_named():
    with pytest.raises(ValueError, match="beta_schedule") as error:
        make_schedule({"name": "linear", "warmup_step": 100})
    assert "warmup_step" in str(error.value) and "warmup_steps" in str(
        error.value
    )  # the typo and the allowed


@pytest.mark.parametrize("name", ["cosine", None, ""])
def test_unknown_name_lists_the_allowed_names(name):
    config = {} if name is None else {"name": name}
    with pytest.raises(ValueError, match="beta_schedule.name") as error:
        make_schedule(config)
    for allowed in ("constant", "linear", "cyclical", "sigmoid", "capacity"):
        assert allowed in str(error.value)


def test_make_schedule_builds_every_schedule():
    assert set(SCHEDULES) == {"constant", "linear", "cyclical", "sigmoid", "capacity"}
    built = {
        "constant": make_schedule({"name": "constant", "beta": 4.0}),
        "linear": make_schedule({"name": "linear", "beta_max": 1.0, "warmup_steps": 10, "start_step": 5}),
        "cyclical": make_schedule({"name": "cyclical", "num_cycles": 2, "ratio": 0.5, "total_steps": 20}),
        "sigmoid": make_schedule({"name": "sigmoid", "midpoint_step": 10, "steepness": 1.0}),
        "capacity": make_schedule({"name": "capacity", "capacity_max": 5.0, "capacity_steps": 10}),
    }
    for name, schedule in built.items():
        assert isinstance(schedule, SCHEDULES[name]) and schedule.name == name
    assert built["constant"].beta_at(3) == 4.0
    assert built["linear"].beta_at(10) == 0.5
    assert built["cyclical"].beta_at(15) == 1.0 and built["cyclical"].beta_at(10) == 0.0
    assert built["sigmoid"].beta_at(10) == 0.5
    assert built["capacity"].capacity_at(5) == 2.5
    config = {"name": "linear", "warmup_steps": 10}
    make_schedule(config)
    assert config == {"name": "linear", "warmup_steps": 10}  # the caller's mapping is not modified
    assert make_schedule({"name": "linear"}) == LinearWarmup()  # defaults


def test_schedules_are_frozen():
    schedule = ConstantBeta(beta=1.0)
    with pytest.raises(AttributeError):
        schedule.beta = 2.0  # type: ignore[misc]
