"""The sweep in MLflow (runs opened and closed on the driver): one parent run per sweep (trials table,
trials.csv, the best configuration) and one nested child run per trial, which the trial's rank-0 worker logs
into like any training run."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.tune.experiment import Trial

from pipeline.common import resolve, say
from pipeline.config import Params, flatten
from pipeline.tracking import compared_params, ensure_experiment, log_params_and_config
from pipeline.tune.space import flat_values, trial_values
from pipeline.tune.stopping import actor


@dataclass(frozen=True)
class SweepRuns:
    """Where a sweep's runs live: the tracking URI, the experiment, the parent run, the lineage tags."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    sweep_name: str
    tags: dict[str, str]  # git commit and data hashes, set on every trial run too


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _find_run(mlflow_client, experiment_id: str, **tags: str):
    conditions = " and ".join(f"tags.{key} = '{value}'" for key, value in tags.items())
    runs = mlflow_client.search_runs([experiment_id], filter_string=conditions, max_results=2,
                                     order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def sweep_experiment(mlflow_client, name: str, uri: str) -> str:
    """The sweep experiment's id (created on the driver, once). With a local store its artifacts go to
    <project>/mlruns, an absolute path (trial processes run in other directories)."""
    location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        location = (resolve("mlruns") / re.sub(r"[^A-Za-z0-9_.-]", "_", name)).as_uri()
    return ensure_experiment(mlflow_client, name, location)


def open_parent_run(
    mlflow_client, experiment_id: str, params: Params, name: str, tags: dict[str, str]
) -> str:
    """The sweep's parent run: found again by its tags when the sweep is resumed, else created."""
    found = _find_run(mlflow_client, experiment_id, sweep_name=name, sweep_role="parent")
    if found is not None:
        mlflow_client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    tune = params.tune
    note = (
        f"Ray Tune sweep `{name}`: {tune.num_samples} trials, Optuna TPE (seed {tune.seed}) + ASHA on "
        f"{tune.metric} (grace {tune.grace_period}, reduction {tune.reduction_factor:g}, max {tune.epochs} "
        "epochs). Child runs are the trials; compare them in "
        "the chart view or with the parallel-coordinates plot."
    )
    run = mlflow_client.create_run(
        experiment_id,
        run_name=name,
        tags={
            "sweep_name": name,
            "sweep_role": "parent",
            "ray_version": ray.__version__,
            "dataset": params.data.dataset,
            "mlflow.note.content": note,
            **tags,
        },
    )
    sweep_settings = {
        key: value for key, value in flatten(params).items()
        if key.startswith("tune.") and not key.startswith("tune.search_space.")
    }
    log_params_and_config(
        mlflow_client, run.info.run_id, {**compared_params(params), **sweep_settings}, params
    )
    mlflow_client.log_dict(
        run.info.run_id, params.tune.search_space.model_dump(mode="json"), "search_space.json"
    )
    return run.info.run_id


def close_trial_run(mlflow_client, run_id: str, status: str, epochs_run: int, max_epochs: int) -> None:
    """FINISHED, KILLED (stopped early by ASHA) or FAILED, with the tags ``stopped_early`` and
    ``epochs_run``."""
    stopped = status == "KILLED"
    mlflow_client.set_tag(run_id, "stopped_early", str(stopped).lower())
    mlflow_client.set_tag(run_id, "epochs_run", str(epochs_run))
    if stopped:
        mlflow_client.set_tag(run_id, "stopped_after_epoch", f"{epochs_run} of {max_epochs}")
    mlflow_client.set_terminated(run_id, status=status)


def trial_runs(runs: SweepRuns) -> dict[str, Any]:
    """The sweep's trial runs by trial id."""
    found = client(runs.tracking_uri).search_runs(
        [runs.experiment_id],
        filter_string=f"tags.sweep_name = '{runs.sweep_name}' and tags.sweep_role = 'trial'",
        max_results=10_000,
    )
    return {run.data.tags.get("trial_id"): run for run in found}


class TrialRuns(ray.tune.Callback):
    """On the driver, the MLflow child run of each trial: opened (or, for a resumed trial, reopened) when the
    trial starts and handed to it through the coordinator; closed when it ends: FINISHED, KILLED with
    ``stopped_early=true`` when ASHA stopped it, FAILED when it errored. Params: the searched values, flat
    (:func:`pipeline.tune.space.flat_values`); the full configuration is the artifact config/params.json (the
    sweep-wide settings are the parent run's params)."""

    def __init__(self, runs: SweepRuns, base: Params, coordinator: str) -> None:
        self.runs, self.base, self.coordinator = runs, base, coordinator
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def client(self):
        if self._client is None:
            self._client = client(self.runs.tracking_uri)
        return self._client

    def run_of(self, trial_id: str):
        return _find_run(
            self.client(), self.runs.experiment_id, sweep_name=self.runs.sweep_name, trial_id=trial_id
        )

    def on_trial_start(self, iteration, trials, trial, **info):
        try:
            found = self.run_of(trial.trial_id)
            if found is not None:
                self.client().update_run(found.info.run_id, status="RUNNING")
                run_id = found.info.run_id
            else:
                run_id = self._create(trial)
            actor(self.coordinator).set_run.remote(trial.trial_id, run_id)
        except Exception as error:  # noqa: BLE001 - the trial then trains without MLflow (it waits, then goes on)
            say(
                "[tune] MLflow: could not open a run for trial "
                f"{trial.trial_id}: {type(error).__name__}: {error}"
            )

    def _create(self, trial: Trial) -> str:
        values = trial_values(trial.config)
        flat = flat_values(values)
        params = values.apply(self.base)
        run = self.client().create_run(
            self.runs.experiment_id,
            run_name=f"{trial.trial_id}-{flat['beta_schedule']}-z{flat['latent_dim']}",
            tags={
                "mlflow.parentRunId": self.runs.parent_run_id,
                "sweep_name": self.runs.sweep_name,
                "sweep_role": "trial",
                "trial_id": trial.trial_id,
                "ray_train_run_name": f"{self.runs.sweep_name}-{trial.trial_id}",
                "dataset": params.data.dataset,
                **self.runs.tags,
            },
        )
        # A sweep's trials are compared by their searched values; the whole configuration is an artifact.
        log_params_and_config(self.client(), run.info.run_id, flat, params)
        return run.info.run_id

    def _close(self, trial: Trial, failed: bool) -> None:
        try:
            run = self.run_of(trial.trial_id)
            if run is None or run.info.status != "RUNNING":
                return
            epochs = int((trial.last_result or {}).get("epoch") or 0)
            max_epochs = self.base.train.epochs
            status = "FAILED" if failed else ("KILLED" if epochs < max_epochs else "FINISHED")
            close_trial_run(self.client(), run.info.run_id, status, epochs, max_epochs)
        except Exception as error:  # noqa: BLE001 - tracking trouble must not stop the sweep
            say(
                "[tune] MLflow: could not close the run of trial "
                f"{trial.trial_id}: {type(error).__name__}: {error}"
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, failed=True)


def log_sweep_summary(
    runs: SweepRuns, rows: list[dict[str, Any]], best: dict[str, Any], metric: str, files: list[Path]
) -> None:
    """The parent run: the trials table (an MLflow table artifact), ``files`` (trials.csv, best_params.yaml),
    a chart of each trial's best metric, and the best configuration as tags."""
    from mlflow.entities import Metric

    mlflow_client, run_id = client(runs.tracking_uri), runs.parent_run_id
    table = [{key: value for key, value in row.items() if key != "config"} for row in rows]
    mlflow_client.log_table(
        run_id,
        data={key: [row.get(key) for row in table] for key in table[0]},
        artifact_file="trials_table.json",
    )
    for path in files:
        mlflow_client.log_artifact(run_id, str(path))
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"trial_best_{metric}", row[f"best_{metric}"], now, index)
        for index, row in enumerate(rows)
        if math.isfinite(row[f"best_{metric}"])
    ]
    metrics += [
        Metric(f"best_{metric}", best[f"best_{metric}"], now, 0),
        Metric("num_trials", len(rows), now, 0),
        Metric("num_stopped_early", sum(row["stopped_early"] for row in rows), now, 0),
    ]
    mlflow_client.log_batch(run_id, metrics=metrics, synchronous=True)
    mlflow_client.set_tag(run_id, "best_trial_id", best["trial_id"])
    mlflow_client.set_tag(run_id, "best_run_id", best["mlflow_run_id"])
    for key, value in flat_values(trial_values(best["config"])).items():
        mlflow_client.set_tag(run_id, f"best.{key}", str(value))
