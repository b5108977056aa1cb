"""Tune stage: a Ray Tune sweep over beta schedules, latent dimensions and learning rates, compared in MLflow.

    python -m pipeline.tune [--params params.yaml]                  # run (or resume) the sweep
    python -m pipeline.tune --only-if-used                          # the DVC stage: sweep only if train uses it
    ray job submit --working-dir . -- python -m pipeline.tune        # the same on a running cluster

Each trial is a Ray Train run (the Train V2 pattern): the Tune trial function builds and fits a ``TorchTrainer``
(:func:`pipeline.train.make_trainer`, the same per-worker loop as the train stage) with its own
``tune.workers_per_trial`` workers, fractional GPUs (``tune.gpus_per_trial_worker``) when the cluster has GPUs, and
``TuneReportCallback``, so each epoch's validation metrics reach Tune. Optuna's TPE sampler (seeded) draws the
configurations from ``tune.search_space`` (schedule families chosen by name, each with its own parameters, built in
code); ASHA stops poor trials on ``tune.metric``. ``tune.max_concurrent_trials: null`` runs as many trials at once as
the cluster's CPUs (and GPUs) fit.

Stopping a trial at an epoch boundary. Left alone, ASHA's STOP reaches a trial after its Train workers have run on
(measured here: workers of trials stopped after epoch 1 had started epoch 3): a report travels worker -> Train
controller -> Tune trial actor -> Tune driver while the workers keep training, and Tune then kills the trial actor,
killing the workers mid-epoch. Here the scheduler (:class:`EpochBoundaryASHA`) sends every decision to a small actor
(:class:`SweepCoordinator`); after each epoch's report the workers wait for the decision on that epoch and leave the
loop when it is "stop". The trial then ends by itself: no extra epoch, checkpoints and MLflow records flushed, and
its MLflow run is closed as KILLED with the tag ``stopped_early=true``.

Resuming. The sweep's name is ``tune.experiment_name`` plus a hash of everything that shapes the sweep (search
space, ASHA/TPE settings, data, model, optimisation; not resources), and its state lives in
``<train.storage_path>/tune/<name>``. Re-running the stage after a crash of the driver restores it there
(``Tuner.restore``): finished trials are kept, unfinished and errored ones go on, each from its Train run's latest
checkpoint (``<name>/trials/<name>-<trial id>``). ASHA's rungs are rebuilt from the restored trials' results; MLflow
runs are found again by their tags. (Tune saves its state every few seconds: a trial that ended just before the crash
is resumed, finds its Train run complete and reports its final epoch again; one that ASHA had just stopped trains on
until ASHA decides again at its next rung.)

MLflow (experiment ``tune.experiment_name``; runs are opened and closed on the driver): one parent run per sweep with
the table of trials, trials.csv and the best configuration; one nested child run per trial with its flat params
(``beta_schedule``, ``latent_dim``, ``learning_rate``, ``schedule.<parameter>``) for the chart view and the run
comparison's parallel-coordinates plot, its full configuration (config/params.json), and the same curves and sample
images as a training run (logged by the trial's rank-0 worker).

Outputs (DVC): reports/tune/trials.csv (a row per trial) and reports/tune/best_params.yaml (read by the train stage
when ``train.use_best_params`` is true), both written atomically.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import ray
from ray.tune.experiment import Trial
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from pipeline.checkpoints import load_state
from pipeline.common import run_stage, stage_argument_parser
from pipeline.config import RUN_IDENTITY_EXCLUDES, Params, flatten, load_params, parse_params, resolve
from pipeline.train import (
    BEST_PARAMS_PATH,
    RaySession,
    StageError,
    atomic_write_text,
    clear_non_finite,
    connect_ray,
    data_hashes,
    git_commit,
    make_trainer,
    non_finite_error,
    ray_train_function,
    storage_uri,
    worker_config,
)
from pipeline.train_loop import NonFiniteLossError, say

TRIALS_PATH = Path("reports/tune/trials.csv")
METRICS = ("val_negative_elbo", "val_bits_per_dim")
# The Train controller forwards the workers' reports when it polls them (every 2 s by default); the workers wait
# for the scheduler's decision on each report, so a shorter poll shortens that wait.
CONTROLLER_POLL_S = "0.5"
# How long a finished trial waits for the scheduler to have seen its final epoch (normally well under a second).
FINAL_RESULT_WAIT_S = 30.0


# ----------------------------------------------------------------------------------------------------------
# Search space: plain data in params.yaml -> an Optuna define-by-run function (serializable: a module-level
# function with the space bound as plain data), schedules chosen by name and built in code.
# ----------------------------------------------------------------------------------------------------------
def _suggest(trial, name: str, spec: Any) -> Any:
    """Draw ``name`` from ``spec`` (dumped pydantic spec: a value, {low, high, log} or {choices})."""
    if isinstance(spec, dict) and "choices" in spec:
        return trial.suggest_categorical(name, spec["choices"])
    if isinstance(spec, dict):
        if isinstance(spec["low"], int) and isinstance(spec["high"], int):
            return trial.suggest_int(name, spec["low"], spec["high"], log=spec["log"])
        return trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"])
    return spec


def suggest_trial_config(trial, space: dict[str, Any]) -> dict[str, Any]:
    """Optuna define-by-run: the schedule family first, then that family's own parameters (conditional), the
    latent dimension and the learning rate. Returns the trial's config with ``/``-separated keys, which Ray Tune
    nests: ``{"beta_schedule": "cyclical", "cyclical": {"num_cycles": 3, ...}, "latent_dim": 64, ...}``."""
    families = {name: spec for name, spec in space["beta_schedule"].items() if spec is not None}
    family = trial.suggest_categorical("beta_schedule", sorted(families))
    config: dict[str, Any] = {"beta_schedule": family}
    for key, spec in families[family].items():
        config[f"{family}/{key}"] = _suggest(trial, f"{family}/{key}", spec)
    config["latent_dim"] = _suggest(trial, "latent_dim", space["latent_dim"])
    config["learning_rate"] = _suggest(trial, "learning_rate", space["learning_rate"])
    return config


def schedule_of(config: dict[str, Any]) -> dict[str, Any]:
    """The beta_schedule section of a trial config: ``{"name": family, **that family's parameters}``."""
    family = config["beta_schedule"]
    return {"name": family, **dict(config.get(family) or {})}


def flat_trial_params(config: dict[str, Any]) -> dict[str, Any]:
    """The searched values with flat names (MLflow params, trials.csv columns): ``beta_schedule``, ``latent_dim``,
    ``learning_rate`` and the family's own parameters as ``schedule.<name>``. (MLflow's run comparison plots the
    first three differing params by name, so these three come first.)"""
    schedule = schedule_of(config)
    return {"beta_schedule": schedule.pop("name"), "latent_dim": config["latent_dim"],
            "learning_rate": config["learning_rate"], **{f"schedule.{key}": value for key, value in schedule.items()}}


def trial_params(base: dict[str, Any], config: dict[str, Any]) -> Params:
    """The full, validated params of one trial: the sweep's base params with the trial's searched values."""
    raw = json.loads(json.dumps(base))
    raw["model"]["latent_dim"] = config["latent_dim"]
    raw["train"]["learning_rate"] = config["learning_rate"]
    raw["beta_schedule"] = schedule_of(config)
    return parse_params(raw, "tune trial config")


def best_params_document(config: dict[str, Any]) -> dict[str, Any]:
    """The ``params`` part of best_params.yaml, in the sections that :func:`pipeline.train.with_best_params` overlays."""
    return {"model": {"latent_dim": config["latent_dim"]}, "train": {"learning_rate": config["learning_rate"]},
            "beta_schedule": schedule_of(config)}


# ----------------------------------------------------------------------------------------------------------
# Early stopping at the epoch boundary
# ----------------------------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class SweepCoordinator:
    """The driver's hand-offs to running trials: each trial's MLflow run id (the driver opens the runs) and the
    scheduler's decision on each (trial, epoch), which the trial's Train workers wait on. The first decision on an
    epoch stands (Tune repeats a trial's last result when the trial ends)."""

    def __init__(self) -> None:
        self._values: dict[tuple[str, str, int], Any] = {}
        self._events: dict[tuple[str, str, int], asyncio.Event] = {}

    def _event(self, key: tuple[str, str, int]) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    async def _put(self, key: tuple[str, str, int], value: Any) -> None:
        self._values.setdefault(key, value)
        self._event(key).set()

    async def _get(self, key: tuple[str, str, int], timeout_s: float) -> Any:
        if key not in self._values:
            try:
                await asyncio.wait_for(self._event(key).wait(), timeout_s)
            except TimeoutError:
                return None
        return self._values[key]

    async def set_run(self, trial_id: str, run_id: str) -> None:
        self._values[("run", trial_id, 0)] = run_id  # a restarted trial may get its run again
        self._event(("run", trial_id, 0)).set()

    async def get_run(self, trial_id: str, timeout_s: float) -> str | None:
        return await self._get(("run", trial_id, 0), timeout_s)

    async def decide(self, trial_id: str, epoch: int, keep_going: bool) -> None:
        await self._put(("decision", trial_id, int(epoch)), bool(keep_going))

    async def wait(self, trial_id: str, epoch: int, timeout_s: float) -> bool | None:
        """True: train on; False: stop; None: no decision within ``timeout_s``."""
        return await self._get(("decision", trial_id, int(epoch)), timeout_s)


def coordinator_name(sweep: str) -> str:
    return f"vae-tune-coordinator-{sweep}"


def _actor(name: str):
    return ray.get_actor(name)


class EpochBoundaryASHA(AsyncHyperBandScheduler):
    """ASHA (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning") whose decisions reach the
    trial's Train workers at the epoch boundary.

    Every decision on a result is sent to :class:`SweepCoordinator`; the workers wait for it after reporting the
    epoch and stop there when it is "stop". Tune is told CONTINUE, so the trial ends by itself (flushed, closed)
    instead of being killed; should a trial report a later epoch anyway, it is stopped the usual way. On restore,
    the rungs are rebuilt from the results the restored trials had reported (Tune does not save scheduler state).
    """

    def __init__(self, coordinator: str, **asha_kwargs: Any) -> None:
        super().__init__(**asha_kwargs)
        self._coordinator = coordinator
        self._coordinator_handle = None
        self._stopped_at: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_coordinator_handle"] = None  # actor handles are not pickled with the experiment
        return state

    def _send(self, trial_id: str, epoch: int, keep_going: bool) -> None:
        try:
            if self._coordinator_handle is None:
                self._coordinator_handle = _actor(self._coordinator)
            self._coordinator_handle.decide.remote(trial_id, epoch, keep_going)
        except Exception as error:  # noqa: BLE001 - the workers then go on after their timeout
            say(f"[tune] could not send the decision on trial {trial_id} epoch {epoch}: {error}")

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        super().on_trial_add(tune_controller, trial)
        history = _reported_results(trial) if trial.last_result else []
        for result in history:  # a restored trial: replay what it reported into the rungs
            super().on_trial_result(tune_controller, trial, result)
        if history and trial.status == Trial.TERMINATED:
            super().on_trial_complete(tune_controller, trial, history[-1])

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        decision = super().on_trial_result(tune_controller, trial, result)
        epoch = result.get(self._time_attr)
        if epoch is None or result.get("done") or decision not in (TrialScheduler.STOP, TrialScheduler.CONTINUE):
            return decision
        stopped_at = self._stopped_at.get(trial.trial_id)
        if stopped_at is not None and epoch > stopped_at:
            return TrialScheduler.STOP  # its workers did not stop: stop the trial the usual way
        keep_going = decision == TrialScheduler.CONTINUE
        if not keep_going:
            self._stopped_at[trial.trial_id] = int(epoch)
            if epoch < self._max_t:
                say(f"[tune] ASHA stops trial {trial.trial_id} after epoch {epoch} "
                    f"({self._metric} {result.get(self._metric, float('nan')):.4f})")
        self._send(trial.trial_id, int(epoch), keep_going)
        return TrialScheduler.CONTINUE


def _reported_results(trial: Trial) -> list[dict[str, Any]]:
    """The results a (restored) trial reported, from its result.json in the sweep's storage."""
    try:
        storage = trial.storage
        with storage.storage_filesystem.open_input_stream(f"{storage.trial_fs_path}/result.json") as stream:
            lines = stream.readall().decode().splitlines()
    except Exception:  # noqa: BLE001 - nothing reported yet, or not readable: nothing to replay
        return []
    results = []
    for line in lines:
        try:
            results.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
    return results


class TrialSession(RaySession):
    """The Ray Train session of a Tune trial's worker: after each epoch's report, wait for the scheduler's decision."""

    def __init__(self, decisions: dict[str, Any]) -> None:
        super().__init__()
        self._decisions = decisions
        self._handle = None

    def should_continue(self, epoch: int) -> bool:
        try:
            if self._handle is None:
                self._handle = _actor(self._decisions["actor"])
            keep_going = ray.get(self._handle.wait.remote(self._decisions["trial_id"], epoch, self._decisions["timeout_s"]))
        except Exception as error:  # noqa: BLE001 - no scheduler to ask (the driver is gone): train on
            say(f"[tune] no scheduler decision on epoch {epoch} ({type(error).__name__}: {error}); training on")
            return True
        if keep_going is None:
            say(f"[tune] no scheduler decision on epoch {epoch} within {self._decisions['timeout_s']:g}s; training on")
            return True
        return keep_going


def trial_worker_function(config: dict[str, Any]) -> None:
    """The function each Train worker of a trial runs: the training loop with the waiting session."""
    ray_train_function(config, TrialSession(config["scheduler_decisions"]))


# ----------------------------------------------------------------------------------------------------------
# MLflow
# ----------------------------------------------------------------------------------------------------------
def _mlflow_client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(uri)


def _find_run(client, experiment_id: str, **tags: str):
    conditions = " and ".join(f"tags.{key} = '{value}'" for key, value in tags.items())
    runs = client.search_runs([experiment_id], filter_string=conditions, max_results=2, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def _log_params(client, run_id: str, values: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(key, str(value)[:6000]) for key, value in values.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100], synchronous=True)


def sweep_experiment(client, name: str, uri: str) -> str:
    """The sweep experiment's id (created on the driver, once). With a local store its artifacts go to
    <project>/mlruns, an absolute path (trial processes run in other directories)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        location = (resolve("mlruns") / re.sub(r"[^A-Za-z0-9_.-]", "_", name)).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:  # noqa: BLE001 - created meanwhile by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def open_parent_run(client, experiment_id: str, params: Params, name: str, hashes: dict[str, str]) -> str:
    """The sweep's parent run: found again by its tags when the sweep is resumed, else created."""
    found = _find_run(client, experiment_id, sweep_name=name, sweep_role="parent")
    if found is not None:
        client.update_run(found.info.run_id, status="RUNNING")
        return found.info.run_id
    tune = params.tune
    note = (f"Ray Tune sweep `{name}`: {tune.num_samples} trials, Optuna TPE (seed {tune.seed}) + ASHA on "
            f"{tune.metric} (grace {tune.grace_period}, reduction {tune.reduction_factor:g}, max {tune.epochs} epochs). "
            "Child runs are the trials; compare them in the chart view or with the parallel-coordinates plot.")
    run = client.create_run(experiment_id, run_name=name, tags={
        "sweep_name": name, "sweep_role": "parent", "git_commit": git_commit(), "ray_version": ray.__version__,
        "dataset": params.data.dataset, "mlflow.note.content": note, **hashes,
    })
    _log_params(client, run.info.run_id, {key: value for key, value in flatten(params).items()
                                          if key.startswith(("tune.", "data.", "model.", "train."))})
    client.log_dict(run.info.run_id, params.tune.search_space.model_dump(mode="json"), "search_space.json")
    return run.info.run_id


def close_trial_run(client, run_id: str, status: str, epochs_run: int, max_epochs: int) -> None:
    """FINISHED, KILLED (stopped early by ASHA) or FAILED, with the tags ``stopped_early`` and ``epochs_run``."""
    stopped = status == "KILLED"
    client.set_tag(run_id, "stopped_early", str(stopped).lower())
    client.set_tag(run_id, "epochs_run", str(epochs_run))
    if stopped:
        client.set_tag(run_id, "stopped_after_epoch", f"{epochs_run} of {max_epochs}")
    client.set_terminated(run_id, status=status)


class TrialRuns(ray.tune.Callback):
    """On the driver, the MLflow child run of each trial: opened (or, for a resumed trial, reopened) when the trial
    starts and handed to it through the coordinator; closed when it ends: FINISHED, KILLED with
    ``stopped_early=true`` when ASHA stopped it, FAILED when it errored. The trial's rank-0 worker logs into it.
    Params: the searched values, flat (:func:`flat_trial_params`); the full configuration is the artifact
    config/params.json (the sweep-wide settings are the parent run's params)."""

    def __init__(self, sweep: dict[str, Any]) -> None:
        self.sweep = {key: sweep[key] for key in ("name", "params", "tracking_uri", "experiment_id", "parent_run_id",
                                                    "coordinator", "hashes", "git_commit")}
        self.epochs = int(sweep["params"]["train"]["epochs"])
        self._client = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def client(self):
        if self._client is None:
            self._client = _mlflow_client(self.sweep["tracking_uri"])
        return self._client

    def run_of(self, trial_id: str):
        return _find_run(self.client(), self.sweep["experiment_id"], sweep_name=self.sweep["name"], trial_id=trial_id)

    def on_trial_start(self, iteration, trials, trial, **info):
        try:
            found = self.run_of(trial.trial_id)
            if found is not None:
                self.client().update_run(found.info.run_id, status="RUNNING")
                run_id = found.info.run_id
            else:
                run_id = self._create(trial)
            _actor(self.sweep["coordinator"]).set_run.remote(trial.trial_id, run_id)
        except Exception as error:  # noqa: BLE001 - the trial then trains without MLflow (it waits, then goes on)
            say(f"[tune] MLflow: could not open a run for trial {trial.trial_id}: {type(error).__name__}: {error}")

    def _create(self, trial: Trial) -> str:
        sweep, config = self.sweep, trial.config
        params, flat = trial_params(sweep["params"], config), flat_trial_params(config)
        run = self.client().create_run(sweep["experiment_id"], run_name=f"{trial.trial_id}-{flat['beta_schedule']}-z{flat['latent_dim']}", tags={
            "mlflow.parentRunId": sweep["parent_run_id"], "sweep_name": sweep["name"], "sweep_role": "trial",
            "trial_id": trial.trial_id, "ray_train_run_name": f"{sweep['name']}-{trial.trial_id}",
            "dataset": params.data.dataset, "git_commit": sweep["git_commit"], **sweep["hashes"],
        })
        _log_params(self.client(), run.info.run_id, flat)
        # The trial's full configuration, as a training run's models/vae/params.json holds it.
        self.client().log_dict(run.info.run_id, params.model_dump(mode="json"), "config/params.json")
        return run.info.run_id

    def _close(self, trial: Trial, failed: bool) -> None:
        try:
            run = self.run_of(trial.trial_id)
            if run is None or run.info.status != "RUNNING":
                return
            epochs = int((trial.last_result or {}).get("epoch") or 0)
            status = "FAILED" if failed else ("KILLED" if epochs < self.epochs else "FINISHED")
            close_trial_run(self.client(), run.info.run_id, status, epochs, self.epochs)
        except Exception as error:  # noqa: BLE001 - tracking trouble must not stop the sweep
            say(f"[tune] MLflow: could not close the run of trial {trial.trial_id}: {type(error).__name__}: {error}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._close(trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._close(trial, failed=True)


# ----------------------------------------------------------------------------------------------------------
# The trial (runs in a Tune trial actor: resolve nothing here, everything arrives as absolute paths)
# ----------------------------------------------------------------------------------------------------------
def run_trial(config: dict[str, Any], sweep: dict[str, Any]) -> None:
    """Tune's trainable: one Ray Train run of the trial's configuration, logging into the trial's MLflow run."""
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    params = trial_params(sweep["params"], config)
    name = f"{sweep['name']}-{trial_id}"
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)
    run_id = ray.get(_actor(sweep["coordinator"]).get_run.remote(trial_id, 120.0))
    if run_id is None:
        say(f"[tune] trial {trial_id}: no MLflow run from the driver; training without tracking")
    local = "://" not in sweep["trials_storage"]
    config = worker_config(params, run_id, sweep["tracking_uri"],
                           Path(sweep["trials_storage"]) / name / "lost_mlflow_records.json" if local else None)
    config["worker"] = dataclasses.replace(config["worker"], processed_dir=sweep["processed_dir"])
    config["scheduler_decisions"] = {"actor": sweep["coordinator"], "trial_id": trial_id,
                                     "timeout_s": sweep["decision_timeout_s"]}
    clear_non_finite(sweep["trials_storage"], name)
    trainer = make_trainer(params, config, name, sweep["use_gpu"], callbacks=[TuneReportCallback()],
                           storage_path=sweep["trials_storage"], train_fn=sweep["worker_fn"] or trial_worker_function)
    result = trainer.fit()
    diverged = non_finite_error(result.filesystem, result.path)
    if diverged:  # the trial fails (Tune does not retry it); the sweep goes on
        raise NonFiniteLossError(f"trial {trial_id} diverged: {diverged}")
    epochs = _epochs_of(result)
    say(f"[tune] trial {trial_id}: {epochs} of {params.train.epochs} epochs")
    _report_if_unseen(result, trial_id, epochs, sweep["coordinator"])


def _report_if_unseen(result, trial_id: str, epochs: int, coordinator: str) -> None:
    """A trial that had finished its Train run before the driver crashed, but not yet in the experiment state Tune
    saved, is resumed: its Train run resumes from its final checkpoint, trains nothing and reports nothing, and Tune
    would end the trial without the metric. The scheduler hands every result it sees to the coordinator, so when none
    arrives for the final epoch, the trial reports that epoch's metrics (from the checkpoint) itself."""
    if not epochs:
        return
    try:
        seen = ray.get(_actor(coordinator).wait.remote(trial_id, epochs, FINAL_RESULT_WAIT_S)) is not None
    except Exception:  # noqa: BLE001 - no coordinator: nothing to compare with
        return
    if seen or result.checkpoint is None:
        return
    with result.checkpoint.as_directory() as directory:
        history = load_state(directory)["history"]
    if history:
        say(f"[tune] trial {trial_id}: its Train run had already finished; reporting its final epoch to Tune")
        ray.tune.report(dict(history[-1]))


def _epochs_of(result) -> int:
    """Epochs a finished Train run did: its last report, else its latest checkpoint's name."""
    epoch = (result.metrics or {}).get("epoch")
    if epoch is not None:
        return int(epoch)
    match = re.search(r"checkpoint_epoch_(\d+)", str(getattr(result.checkpoint, "path", "")))
    return int(match.group(1)) if match else 0


def trial_dirname(trial: Trial) -> str:
    """Trial folders named by trial id (the id that names the Train run and tags the MLflow run)."""
    return trial.trial_id


# ----------------------------------------------------------------------------------------------------------
# The sweep (driver)
# ----------------------------------------------------------------------------------------------------------
def sweep_name(params: Params, hashes: dict[str, str]) -> str:
    """``tune.experiment_name``-<8 hex>: the hash covers what shapes the sweep's results (search space, ASHA and
    TPE settings, data, model, optimisation), not resources, so a changed sweep never resumes an unrelated one."""
    tune = params.tune.model_dump(mode="json", include={"num_samples", "metric", "grace_period", "reduction_factor",
                                                         "seed", "epochs", "search_space"})
    shaping = params.model_dump(mode="json", include={"data", "model"})
    shaping["model"].pop("latent_dim")
    train = params.train.model_dump(mode="json", exclude=set(RUN_IDENTITY_EXCLUDES) | {"epochs", "learning_rate"})
    digest = hashlib.sha256(json.dumps([tune, shaping, train, hashes], sort_keys=True).encode()).hexdigest()[:8]
    return f"{params.tune.experiment_name}-{digest}"


def trial_resources(params: Params) -> tuple[bool, int]:
    """(whether trial workers use GPUs, how many trials run at once) from params and the cluster's resources.

    Raises:
        StageError: GPUs are required but missing, or one trial does not fit the cluster.
    """
    tune = params.tune
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    wanted = params.train.use_gpu
    if wanted is True and tune.gpus_per_trial_worker > 0 and gpus < tune.gpus_per_trial_worker * tune.workers_per_trial:
        raise StageError(f"train.use_gpu is true and a trial needs {tune.workers_per_trial} x {tune.gpus_per_trial_worker:g} "
                         f"GPU, but the Ray cluster has {gpus:g} GPU(s); set train.use_gpu: auto or lower "
                         "tune.gpus_per_trial_worker")
    use_gpu = tune.gpus_per_trial_worker > 0 and wanted is not False and gpus > 0
    cpus_per_trial = tune.workers_per_trial * tune.cpus_per_trial_worker + tune.cpus_per_trial_driver
    fit = math.floor(cpus / cpus_per_trial + 1e-9)
    if use_gpu:
        fit = min(fit, math.floor(gpus / (tune.workers_per_trial * tune.gpus_per_trial_worker) + 1e-9))
    if fit < 1 and not os.environ.get("RAY_AUTOSCALER_ENABLED"):
        raise StageError(f"one trial needs {cpus_per_trial:g} CPUs (tune.workers_per_trial x tune.cpus_per_trial_worker "
                         f"+ tune.cpus_per_trial_driver) but the Ray cluster has {cpus:g}; lower them, or add nodes")
    concurrent = tune.max_concurrent_trials or max(1, min(fit, tune.num_samples))
    return use_gpu, concurrent


def base_trial_params(params: Params, use_gpu: bool) -> dict[str, Any]:
    """The params every trial starts from: the train section set up for a trial (epochs, workers, resources)."""
    raw = params.model_dump(mode="json")
    tune = params.tune
    raw["train"].update(epochs=tune.epochs, num_workers=tune.workers_per_trial, cpus_per_worker=tune.cpus_per_trial_worker,
                        use_gpu=use_gpu, use_best_params=False)
    if tune.gpus_per_trial_worker > 0:
        raw["train"]["gpus_per_worker"] = tune.gpus_per_trial_worker
    return raw


def make_tuner(params: Params, sweep: dict[str, Any], tune_storage: str, concurrent: int):
    """A new Tuner, or the sweep's own restored from its storage path when a previous run of it left state there."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_resources(tune.with_parameters(run_trial, sweep=sweep),
                                    {"CPU": params.tune.cpus_per_trial_driver})
    experiment_path = f"{tune_storage}/{sweep['name']}"
    if tune.Tuner.can_restore(experiment_path):
        say(f"[tune] resuming sweep {sweep['name']} from {experiment_path}")
        return tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True)
    settings = params.tune
    searcher = OptunaSearch(space=functools.partial(suggest_trial_config, space=settings.search_space.model_dump(mode="json")),
                            metric=settings.metric, mode="min", seed=settings.seed)
    scheduler = EpochBoundaryASHA(sweep["coordinator"], time_attr="epoch", metric=settings.metric, mode="min",
                                  max_t=settings.epochs, grace_period=settings.grace_period,
                                  reduction_factor=settings.reduction_factor)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=settings.num_samples,
                                    max_concurrent_trials=concurrent, trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(
            name=sweep["name"], storage_path=tune_storage,
            callbacks=[TrialRuns(sweep)],
            verbose=1,
        ),
    )


def trial_rows(results, epochs: int, metric: str) -> list[dict[str, Any]]:
    """One row per trial from Tune's results: id, status, searched values, epochs run, final and best metrics."""
    rows = []
    for result in results:
        last = result.metrics or {}
        trial_id = last.get("trial_id") or Path(result.path).name
        history = result.metrics_dataframe
        if history is None or "epoch" not in history or history["epoch"].isna().all():
            history = None
        else:  # a resumed trial may have reported an epoch twice: keep its last report
            history = (history.dropna(subset=["epoch"]).drop_duplicates(subset=["epoch"], keep="last")
                       .sort_values("epoch").reset_index(drop=True))
        epochs_run = int(history["epoch"].max()) if history is not None else 0
        row: dict[str, Any] = {"trial_id": trial_id}
        row["status"] = "error" if result.error else ("stopped_early" if epochs_run < epochs else "completed")
        row["stopped_early"] = row["status"] == "stopped_early"
        row["epochs_run"] = epochs_run
        row.update(flat_trial_params(result.config))
        for name in METRICS:
            values = history[name] if history is not None and name in history else None
            row[f"final_{name}"] = float(values.iloc[-1]) if values is not None else math.nan
            row[f"best_{name}"] = float(values.min()) if values is not None else math.nan
            if name == metric:
                row["best_epoch"] = int(history["epoch"][values.idxmin()]) if values is not None else 0
        row["time_total_s"] = round(float(last.get("time_total_s") or 0.0), 1)
        row["error"] = str(result.error).splitlines()[0][:300] if result.error else ""
        row["config"] = result.config
        rows.append(row)
    return rows  # in the order the trials were created


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The trial with the lowest ``best_<metric>`` (its best epoch), None when no trial reported one."""
    scored = [row for row in rows if math.isfinite(row[f"best_{metric}"])]
    return min(scored, key=lambda row: row[f"best_{metric}"]) if scored else None


def trials_csv(rows: list[dict[str, Any]]) -> str:
    fixed = ["trial_id", "status", "stopped_early", "epochs_run", "beta_schedule", "latent_dim", "learning_rate"]
    schedule_keys = sorted({key for row in rows for key in flat_trial_params(row["config"])} - set(fixed))
    metric_keys = [f"{kind}_{name}" for name in METRICS for kind in ("final", "best")]
    fields = fixed + schedule_keys + metric_keys + ["best_epoch", "time_total_s", "mlflow_run_id", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def tune_sweep(params: Params, worker_fn=None) -> dict[str, Any]:
    """Run (or resume) the sweep and write reports/tune/. Returns {"sweep", "rows", "best", "parent_run_id"}.

    ``worker_fn`` replaces the trials' Train worker function (:func:`trial_worker_function`); tests wrap it.

    Raises:
        StageError: no data, no cluster or too few resources, or no trial produced a result.
    """
    import yaml

    from pipeline.tracking import tracking_uri

    processed = params.data.processed_path()
    if not (processed / "train_images.npy").is_file() or not (processed / "valid_images.npy").is_file():
        raise StageError(f"no preprocessed data in {processed}: run `dvc repro preprocess` first")
    hashes = data_hashes(processed)
    name = sweep_name(params, hashes)
    tune_storage = storage_uri(params.train.storage_path).rstrip("/") + "/tune"
    experiment_path = f"{tune_storage}/{name}"
    connect_ray(params)
    use_gpu, concurrent = trial_resources(params)
    uri = tracking_uri(params.mlflow.tracking_uri)
    client = _mlflow_client(uri)
    experiment_id = sweep_experiment(client, params.tune.experiment_name, uri)
    parent_run_id = open_parent_run(client, experiment_id, params, name, hashes)
    coordinator = SweepCoordinator.options(name=coordinator_name(name), get_if_exists=True).remote()
    sweep = {
        "name": name, "params": base_trial_params(params, use_gpu), "processed_dir": str(processed),
        "trials_storage": f"{experiment_path}/trials", "tracking_uri": uri, "experiment_id": experiment_id,
        "parent_run_id": parent_run_id, "coordinator": coordinator_name(name),
        "decision_timeout_s": params.tune.decision_timeout_s, "use_gpu": use_gpu, "hashes": hashes,
        "git_commit": git_commit(), "worker_fn": worker_fn,
    }
    say(f"[tune] sweep {name}: {params.tune.num_samples} trials, {concurrent} at a time, "
        f"{params.tune.workers_per_trial} worker(s) per trial on {'GPU' if use_gpu else 'CPU'}; state in "
        f"{experiment_path}; MLflow experiment '{params.tune.experiment_name}' parent run {parent_run_id} at {uri}")
    started = time.perf_counter()
    try:
        results = make_tuner(params, sweep, tune_storage, concurrent).fit()
        rows = trial_rows(results, params.tune.epochs, params.tune.metric)
    except Exception as error:
        client.set_terminated(parent_run_id, status="FAILED")
        raise StageError(f"the sweep failed: {type(error).__name__}: {error}\nRe-running the stage resumes it "
                         f"from {experiment_path}.") from error
    finally:
        ray.kill(coordinator)
    metric = params.tune.metric
    children = {run.data.tags.get("trial_id"): run for run in client.search_runs(
        [experiment_id], filter_string=f"tags.sweep_name = '{name}' and tags.sweep_role = 'trial'", max_results=10_000)}
    for row in rows:
        run = children.get(row["trial_id"])
        row["mlflow_run_id"] = run.info.run_id if run else ""
        if run is not None and run.info.status == "RUNNING":  # its trial actor died before closing it
            status = {"error": "FAILED", "stopped_early": "KILLED"}.get(row["status"], "FINISHED")
            close_trial_run(client, run.info.run_id, status, row["epochs_run"], params.tune.epochs)
    best = best_row(rows, metric)
    if best is None:
        client.set_terminated(parent_run_id, status="FAILED")
        errors = "; ".join(f"{row['trial_id']}: {row['error']}" for row in rows if row["error"])[:2000]
        raise StageError(f"no trial of sweep {name} reported {metric}. {errors}")
    document = {
        "sweep": name, "trial_id": best["trial_id"], "mlflow_run_id": best["mlflow_run_id"], "metric": metric,
        "mode": "min", "value": best[f"best_{metric}"], "epoch": best["best_epoch"], "epochs_run": best["epochs_run"],
        "params": best_params_document(best["config"]),
    }
    atomic_write_text(TRIALS_PATH, trials_csv(rows))
    atomic_write_text(BEST_PARAMS_PATH, "# Written by `python -m pipeline.tune`; read by the train stage when "
                      "train.use_best_params is true.\n" + yaml.safe_dump(document, sort_keys=False))
    try:
        _log_sweep_summary(client, parent_run_id, rows, best, metric)
        client.set_terminated(parent_run_id, status="FINISHED")
    except Exception as error:  # noqa: BLE001 - the outputs are written; tracking trouble must not lose them
        say(f"[tune] MLflow: could not log the sweep summary ({type(error).__name__}: {error})")
    say(f"[tune] sweep {name} done in {time.perf_counter() - started:.0f}s: {len(rows)} trials "
        f"({sum(r['stopped_early'] for r in rows)} stopped early, {sum(r['status'] == 'error' for r in rows)} failed); "
        f"best {metric} {best[f'best_{metric}']:.4f} by trial {best['trial_id']}")
    return {"sweep": name, "rows": rows, "best": document, "parent_run_id": parent_run_id}


def _log_sweep_summary(client, run_id: str, rows: list[dict[str, Any]], best: dict[str, Any], metric: str) -> None:
    """The parent run: the trials table (an MLflow table artifact and trials.csv), the best config, a chart of each
    trial's best metric, and the best configuration as tags."""
    from mlflow.entities import Metric

    table = [{key: value for key, value in row.items() if key != "config"} for row in rows]
    client.log_table(run_id, data={key: [row.get(key) for row in table] for key in table[0]}, artifact_file="trials_table.json")
    client.log_artifact(run_id, str(resolve(TRIALS_PATH)))
    client.log_artifact(run_id, str(resolve(BEST_PARAMS_PATH)))
    now = int(time.time() * 1000)
    metrics = [Metric(f"trial_best_{metric}", row[f"best_{metric}"], now, index)
               for index, row in enumerate(rows) if math.isfinite(row[f"best_{metric}"])]
    metrics += [Metric(f"best_{metric}", best[f"best_{metric}"], now, 0),
                Metric("num_trials", len(rows), now, 0),
                Metric("num_stopped_early", sum(row["stopped_early"] for row in rows), now, 0)]
    client.log_batch(run_id, metrics=metrics, synchronous=True)
    client.set_tag(run_id, "best_trial_id", best["trial_id"])
    client.set_tag(run_id, "best_run_id", best["mlflow_run_id"])
    for key, value in flat_trial_params(best["config"]).items():
        client.set_tag(run_id, f"best.{key}", str(value))


def write_skipped(params: Params) -> None:
    """The DVC stage's outputs when no sweep is wanted: a header-only trials.csv and a best_params.yaml marked
    ``skipped`` (the train stage refuses it should train.use_best_params be switched on without a sweep)."""
    import yaml

    reason = "train.use_best_params is false, so the train stage does not use a sweep"
    atomic_write_text(TRIALS_PATH, trials_csv([]))
    atomic_write_text(BEST_PARAMS_PATH, "# Written by `python -m pipeline.tune --only-if-used`: no sweep was run.\n"
                      + yaml.safe_dump({"skipped": True, "reason": reason, "params": {}}, sort_keys=False))
    say(f"[tune] no sweep: {reason} (run one any time with `python -m pipeline.tune`)")


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.tune [--params PATH] [--only-if-used]``: exit status 0, or 1 with a clear message."""
    parser = stage_argument_parser("pipeline.tune", __doc__)
    parser.add_argument("--only-if-used", action="store_true",
                        help="sweep only when train.use_best_params is true, else just record that none was wanted "
                             "(the DVC stage, so that `dvc repro` sweeps only for a train stage that uses the result)")
    args = parser.parse_args(argv)

    def body() -> int:
        from pipeline.submit import should_submit, submit_stage

        params = load_params(args.params)
        if args.only_if_used and not params.train.use_best_params:
            write_skipped(params)
            return 0
        if should_submit(params):  # not inside the submitted job itself (it reads the same params)
            return submit_stage("pipeline.tune", params, args.params)
        summary = tune_sweep(params)
        print(f"[tune] best configuration ({summary['best']['metric']} {summary['best']['value']:.4f}) in "
              f"{resolve(BEST_PARAMS_PATH)}, all trials in {resolve(TRIALS_PATH)}; train it with "
              "train.use_best_params: true")
        return 0

    return run_stage("tune", body)


if __name__ == "__main__":
    # Run as pipeline.tune (not __main__), so the pickled sweep state names its classes by their importable module.
    from pipeline import tune as _stage

    sys.exit(_stage.main())
