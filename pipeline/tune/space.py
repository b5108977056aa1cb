"""A trial's values: drawn by Optuna from ``tune.search_space`` (define-by-run, so each schedule family has
its own parameters), read back from the config Ray Tune keeps, and flattened for MLflow and trials.csv."""

from __future__ import annotations

from typing import Any

from pipeline.config import SearchedValues
from pipeline.search_space import FAMILY_SPACES, SearchSpace, suggest
from pipeline.tracking import schedule_params


def suggest_trial_config(trial, space: SearchSpace) -> dict[str, Any]:
    """Optuna define-by-run: the schedule family first, then that family's own parameters (conditional), the
    latent dimension and the learning rate. Returns the trial's config with ``/``-separated keys, which Ray
    Tune
    nests: ``{"beta_schedule": "cyclical", "cyclical": {"num_cycles": 3, ...}, "latent_dim": 64, ...}``."""
    families = space.families()
    family = trial.suggest_categorical("beta_schedule", sorted(families))
    config: dict[str, Any] = {"beta_schedule": family}
    config.update({f"{family}/{key}": value for key, value in families[family].suggest(trial).items()})
    config["latent_dim"] = suggest(space.latent_dim, trial, "latent_dim")
    config["learning_rate"] = suggest(space.learning_rate, trial, "learning_rate")
    return config


def trial_values(config: dict[str, Any]) -> SearchedValues:
    """The typed values of a trial config as Ray Tune holds it (see :func:`suggest_trial_config`)."""
    family = config["beta_schedule"]
    return SearchedValues(latent_dim=config["latent_dim"], learning_rate=config["learning_rate"],
                          beta_schedule=FAMILY_SPACES[family].schedule(dict(config.get(family) or {})))


def flat_values(values: SearchedValues) -> dict[str, Any]:
    """The searched values with flat names (MLflow params, trials.csv columns): ``beta_schedule``,
    ``latent_dim``, ``learning_rate`` and the schedule's own parameters as ``schedule.<name>``. (MLflow's run
    comparison plots the first three differing params by name, so these three come first.)"""
    beta_schedule = schedule_params(values.beta_schedule)
    return {
        "beta_schedule": beta_schedule.pop("beta_schedule"),
        "latent_dim": values.latent_dim,
        "learning_rate": values.learning_rate,
        **beta_schedule,
    }
