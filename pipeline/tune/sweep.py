"""The sweep: each trial a Ray Train run of the shared per-worker loop (Train V2's pattern: the Tune trainable
fits a ``TorchTrainer``), Optuna's TPE proposing, ASHA stopping at epoch boundaries; resumed from its storage
after a crash of the driver; outputs reports/tune/trials.csv and best_params.yaml."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from pipeline import artifacts, ray_runtime, storage
from pipeline.artifacts import sweep_name
from pipeline.checkpoints import load_state
from pipeline.cli import run_stage, stage_argument_parser
from pipeline.common import StageError, atomic_write_text, resolve, say
from pipeline.config import Params
from pipeline.data import data_hashes, dataset_folder
from pipeline.params_file import load_params
from pipeline.sessions import NonFiniteLossError
from pipeline.tracking import lineage_tags, tracking_uri
from pipeline.train_plan import check_batch_fits
from pipeline.tune import tracking
from pipeline.tune.results import best_row, trial_rows, trials_csv
from pipeline.tune.space import suggest_trial_config, trial_values
from pipeline.tune.stopping import EpochBoundaryASHA, SweepCoordinator, TrialSession, actor, coordinator_name

# The Train controller forwards the workers' reports when it polls them (every 2 s by default); the workers
# wait for the scheduler's decision on each report, so a shorter poll shortens that wait.
CONTROLLER_POLL_S = "0.5"
# How long a finished trial waits for the scheduler to have seen its final epoch (normally well under a
# second).
FINAL_RESULT_WAIT_S = 30.0


@dataclass(frozen=True)
class Sweep:
    """What every trial of a sweep shares (handed to the Tune trainable).

    Attributes:
        name: the sweep's name (``tune.experiment_name``-<hash>), also its storage folder.
        base: the params every trial starts from (the train section set up for a trial).
        processed_dir: absolute path or URI (s3://...) of the preprocessed arrays (URIs: read through
            each node's cache, pipeline.storage.local_dataset).
        trials_storage: where the trials' Train runs keep their checkpoints.
        runs: the sweep's MLflow runs.
        coordinator: the name of the :class:`SweepCoordinator` actor.
        decision_timeout_s: the longest wait of a trial's workers for the scheduler's decision.
        use_gpu: whether trial workers train on GPUs. worker_fn: the trials' Train worker function (None:
        :func:`trial_worker_function`; tests wrap it).
    """

    name: str
    base: Params
    processed_dir: str
    trials_storage: str
    runs: tracking.SweepRuns
    coordinator: str
    decision_timeout_s: float
    use_gpu: bool
    worker_fn: Callable[[dict[str, Any]], None] | None = None


# ----------------------------------------------------------------------------------------------------------
# The trial (runs in a Tune trial actor: everything arrives as absolute paths)
# ----------------------------------------------------------------------------------------------------------
def trial_worker_function(config: dict[str, Any]) -> None:
    """The function each Train worker of a trial runs: the training loop with the waiting session."""
    ray_runtime.ray_train_function(config, TrialSession(config["scheduler_decisions"]))


def run_trial(config: dict[str, Any], sweep: Sweep) -> None:
    """Tune's trainable: one Ray Train run of the trial's values, logging into the trial's MLflow run.

    Raises:
        NonFiniteLossError: the trial diverged (Tune marks it failed and does not retry it; the sweep goes
        on).
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = ray.tune.get_context().get_trial_id()
    params = trial_values(config).apply(sweep.base)
    name = f"{sweep.name}-{trial_id}"
    # Tune's restore re-runs errored trials (resume_errored, for trials a dead node ended); a trial that
    # diverged would only diverge again and log its steps twice, so it ends at once with the same error.
    earlier = ray_runtime.earlier_divergence(sweep.trials_storage, name, params.cluster.s3_endpoint_url)
    if earlier:
        raise NonFiniteLossError(
            f"trial {trial_id} diverged in an earlier attempt (not trained again): {earlier}"
        )
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", CONTROLLER_POLL_S)
    run_id = ray.get(actor(sweep.coordinator).get_run.remote(trial_id, 120.0))
    if run_id is None:
        say(f"[tune] trial {trial_id}: no MLflow run from the driver; training without tracking")
    train_config = ray_runtime.worker_config(
        params, run_id, sweep.runs.tracking_uri, storage.join(sweep.trials_storage, name))
    train_config["worker"] = dataclasses.replace(train_config["worker"], processed_dir=sweep.processed_dir)
    train_config["scheduler_decisions"] = {
        "actor": sweep.coordinator,
        "trial_id": trial_id,
        "timeout_s": sweep.decision_timeout_s,
    }
    trainer = ray_runtime.make_trainer(
        params,
        train_config,
        name,
        sweep.use_gpu,
        callbacks=[TuneReportCallback()],
        storage_path=sweep.trials_storage,
        train_fn=sweep.worker_fn or trial_worker_function,
    )
    result = trainer.fit()
    diverged = ray_runtime.non_finite_error(result.filesystem, result.path)
    if diverged:
        raise NonFiniteLossError(f"trial {trial_id} diverged: {diverged}")
    epochs = _epochs_of(result)
    say(f"[tune] trial {trial_id}: {epochs} of {params.train.epochs} epochs")
    _report_if_unseen(result, trial_id, epochs, sweep.coordinator)


def _report_if_unseen(result, trial_id: str, epochs: int, coordinator: str) -> None:
    """A trial whose Train run had finished before the driver crashed, but not yet in the state Tune saved, is
    resumed: its Train run resumes from its final checkpoint, trains nothing and reports nothing, and Tune
    would end the trial without the metric. The scheduler hands every result it sees to the coordinator, so
    when none arrives for the final epoch, the trial reports that epoch's metrics (from the checkpoint)
    itself."""
    if not epochs:
        return
    try:
        seen = ray.get(actor(coordinator).wait.remote(trial_id, epochs, FINAL_RESULT_WAIT_S)) is not None
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


def trial_dirname(trial) -> str:
    """Trial folders named by trial id (the id that names the Train run and tags the MLflow run)."""
    return trial.trial_id


# ----------------------------------------------------------------------------------------------------------
# The sweep (driver)
# ----------------------------------------------------------------------------------------------------------
def trial_resources(params: Params) -> tuple[bool, int]:
    """(whether trial workers use GPUs, how many trials run at once) from params and the cluster's resources.

    Raises:
        StageError: GPUs are required but missing, or one trial does not fit the cluster.
    """
    tune = params.tune
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    wanted = params.train.use_gpu
    per_trial_gpus = tune.gpus_per_trial_worker * tune.workers_per_trial
    if wanted is True and tune.gpus_per_trial_worker > 0 and gpus < per_trial_gpus:
        raise StageError(
            f"train.use_gpu is true and a trial needs {tune.workers_per_trial} x "
            f"{tune.gpus_per_trial_worker:g} GPU, but the Ray cluster has {gpus:g} GPU(s); set "
            "train.use_gpu: auto or lower tune.gpus_per_trial_worker"
        )
    use_gpu = tune.gpus_per_trial_worker > 0 and wanted is not False and gpus > 0
    cpus_per_trial = tune.workers_per_trial * tune.cpus_per_trial_worker + tune.cpus_per_trial_driver
    fit = math.floor(cpus / cpus_per_trial + 1e-9)
    if use_gpu:
        fit = min(fit, math.floor(gpus / per_trial_gpus + 1e-9))
    if fit < 1 and not os.environ.get("RAY_AUTOSCALER_ENABLED"):
        raise StageError(
            f"one trial needs {cpus_per_trial:g} CPUs (tune.workers_per_trial x "
            "tune.cpus_per_trial_worker + tune.cpus_per_trial_driver) but the Ray cluster has "
            f"{cpus:g}; lower them, or add nodes"
        )
    return use_gpu, tune.max_concurrent_trials or max(1, min(fit, tune.num_samples))


def base_trial_params(params: Params, use_gpu: bool) -> Params:
    """The params every trial starts from: the train section set up for a trial (epochs, workers,
    resources)."""
    tune = params.tune
    train = {
        "epochs": tune.epochs,
        "num_workers": tune.workers_per_trial,
        "min_workers": None,
        "cpus_per_worker": tune.cpus_per_trial_worker,
        "use_gpu": use_gpu,
        "use_best_params": False,
    }
    if tune.gpus_per_trial_worker > 0:
        train["gpus_per_worker"] = tune.gpus_per_trial_worker
    return params.model_copy(update={"train": params.train.model_copy(update=train)})


def make_tuner(params: Params, sweep: Sweep, tune_storage: str, concurrent: int):
    """A new Tuner, or the sweep's own restored from its storage path when a previous run of it left state
    there."""
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=sweep), {"CPU": params.tune.cpus_per_trial_driver}
    )
    storage = ray_runtime.run_storage(tune_storage, params)  # an S3 filesystem with the endpoint for s3://
    experiment_path = f"{storage['storage_path']}/{sweep.name}"
    filesystem = storage.get("storage_filesystem")
    if tune.Tuner.can_restore(experiment_path, storage_filesystem=filesystem):
        say(f"[tune] resuming sweep {sweep.name} from {tune_storage}/{sweep.name}")
        return tune.Tuner.restore(experiment_path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=filesystem)
    settings = params.tune
    searcher = OptunaSearch(
        space=functools.partial(suggest_trial_config, space=settings.search_space),
        metric=settings.metric,
        mode="min",
        seed=settings.seed,
    )
    scheduler = EpochBoundaryASHA(
        sweep.coordinator,
        time_attr="epoch",
        metric=settings.metric,
        mode="min",
        max_t=settings.epochs,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=settings.num_samples,
            max_concurrent_trials=concurrent,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=sweep.name,
            **storage,
            verbose=1,
            callbacks=[tracking.TrialRuns(sweep.runs, sweep.base, sweep.coordinator)],
        ),
    )


def tune_sweep(params: Params, worker_fn=None) -> dict[str, Any]:
    """Run (or resume) the sweep and write reports/tune/. Returns {"sweep", "rows", "best", "parent_run_id"}.

    ``worker_fn`` replaces the trials' Train worker function (:func:`trial_worker_function`); tests wrap it.

    Raises:
        StageError: no data, no cluster or too few resources, or no trial produced a result.
    """
    processed = dataset_folder(params.data.processed_location(), params.cluster.s3_endpoint_url)
    if not (processed / "train_images.npy").is_file() or not (processed / "valid_images.npy").is_file():
        raise StageError(f"no preprocessed data in {processed}: run `dvc repro preprocess` first")
    check_batch_fits(params.train, processed, [params.tune.workers_per_trial])
    hashes = data_hashes(processed)
    name = sweep_name(params, hashes)
    tune_storage = ray_runtime.storage_uri(params.train.storage_path).rstrip("/") + "/tune"
    experiment_path = f"{tune_storage}/{name}"
    ray_runtime.connect_ray(params)
    use_gpu, concurrent = trial_resources(params)
    uri = tracking_uri(params.mlflow.tracking_uri)
    client = tracking.client(uri)
    experiment_id = tracking.sweep_experiment(client, params.tune.experiment_name, uri)
    tags = {**lineage_tags(), **hashes}
    runs = tracking.SweepRuns(
        uri, experiment_id, tracking.open_parent_run(client, experiment_id, params, name, tags), name, tags
    )
    coordinator = SweepCoordinator.options(name=coordinator_name(name), get_if_exists=True).remote()
    sweep = Sweep(
        name,
        base_trial_params(params, use_gpu),
        params.data.processed_location(),
        f"{experiment_path}/trials",
        runs,
        coordinator_name(name),
        params.tune.decision_timeout_s,
        use_gpu,
        worker_fn,
    )
    say(
        f"[tune] sweep {name}: {params.tune.num_samples} trials, {concurrent} at a time, "
        f"{params.tune.workers_per_trial} worker(s) per trial on {'GPU' if use_gpu else 'CPU'}; state in "
        f"{experiment_path}; MLflow experiment "
        f"'{params.tune.experiment_name}' parent run {runs.parent_run_id} "
        f"at {uri}"
    )
    started = time.perf_counter()
    try:
        rows = trial_rows(
            make_tuner(params, sweep, tune_storage, concurrent).fit(), params.tune.epochs, params.tune.metric
        )
    except Exception as error:
        client.set_terminated(runs.parent_run_id, status="FAILED")
        raise StageError(
            f"the sweep failed: {type(error).__name__}: {error}\nRe-running the stage resumes it "
            f"from {experiment_path}."
        ) from error
    finally:
        ray.kill(coordinator)
    metric = params.tune.metric
    children = tracking.trial_runs(runs)
    for row in rows:
        run = children.get(row["trial_id"])
        row["mlflow_run_id"] = run.info.run_id if run else ""
        if run is not None and run.info.status == "RUNNING":  # its trial actor died before closing it
            status = {"error": "FAILED", "stopped_early": "KILLED"}.get(row["status"], "FINISHED")
            tracking.close_trial_run(client, run.info.run_id, status, row["epochs_run"], params.tune.epochs)
    best = best_row(rows, metric)
    if best is None:
        client.set_terminated(runs.parent_run_id, status="FAILED")
        errors = "; ".join(f"{row['trial_id']}: {row['error']}" for row in rows if row["error"])[:2000]
        raise StageError(f"no trial of sweep {name} reported {metric}. {errors}")
    summary = {
        "sweep": name,
        "trial_id": best["trial_id"],
        "mlflow_run_id": best["mlflow_run_id"],
        "metric": metric,
        "mode": "min",
        "value": best[f"best_{metric}"],
        "epoch": best["best_epoch"],
        "epochs_run": best["epochs_run"],
    }
    atomic_write_text(artifacts.TRIALS_PATH, trials_csv(rows))
    artifacts.write_best_params(summary, trial_values(best["config"]))
    saved = artifacts.save_sweep_outputs(params, name)  # what a later stage or job reads, by the sweep's name
    try:
        tracking.log_sweep_summary(
            runs, rows, best, metric, [resolve(artifacts.TRIALS_PATH), resolve(artifacts.BEST_PARAMS_PATH)]
        )
        client.set_terminated(runs.parent_run_id, status="FINISHED")
    except Exception as error:  # noqa: BLE001 - the outputs are written; tracking trouble must not lose them
        say(f"[tune] MLflow: could not log the sweep summary ({type(error).__name__}: {error})")
    say(
        f"[tune] sweep {name} done in {time.perf_counter() - started:.0f}s: {len(rows)} trials "
        f"({sum(r['stopped_early'] for r in rows)} stopped "
        f"early, {sum(r['status'] == 'error' for r in rows)} "
        f"failed); best {metric} {best[f'best_{metric}']:.4f} by trial {best['trial_id']}; results also in "
        f"{saved}"
    )
    return {
        "sweep": name,
        "rows": rows,
        "best": {**summary, "params": trial_values(best["config"])},
        "parent_run_id": runs.parent_run_id,
    }


def write_skipped() -> None:
    """The DVC stage's outputs when no sweep is wanted: a header-only trials.csv and a best_params.yaml marked
    ``skipped`` (the train stage refuses it should train.use_best_params be switched on without a sweep)."""
    reason = "train.use_best_params is false, so the train stage does not use a sweep"
    atomic_write_text(artifacts.TRIALS_PATH, trials_csv([]))
    artifacts.write_no_sweep(reason)
    say(f"[tune] no sweep: {reason} (run one any time with `python -m pipeline.tune`)")


def report(params: Params) -> None:
    """Run the sweep and say where its results are."""
    best = tune_sweep(params)["best"]
    print(
        f"[tune] best configuration ({best['metric']} {best['value']:.4f}) in "
        f"{resolve(artifacts.BEST_PARAMS_PATH)}, all trials "
        f"in {resolve(artifacts.TRIALS_PATH)}; train it with "
        "train.use_best_params: true"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.tune [--params PATH] [--only-if-used]``: exit status 0, or 1 with a clear
    message."""
    from pipeline import tune as package

    parser = stage_argument_parser("pipeline.tune", package.__doc__)
    parser.add_argument(
        "--only-if-used",
        action="store_true",
        help="sweep only when train.use_best_params is true, else just record that none was wanted "
        "(the DVC stage, so that `dvc repro` sweeps only for a train stage that uses the result)",
    )
    args = parser.parse_args(argv)

    def body() -> int:
        from pipeline.submit import run_or_submit

        params = load_params(args.params)
        if args.only_if_used and not params.train.use_best_params:
            write_skipped()
            return 0
        return run_or_submit("pipeline.tune", params, args.params, report)

    return run_stage("tune", body)


if __name__ == "__main__":
    sys.exit(main())
