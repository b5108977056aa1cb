"""The tune stage on a real local Ray instance and a real MLflow (SQLite) store: a small CPU sweep of Ray
Train trials, ASHA stopping trials at the epoch boundary, and a sweep resumed after its driver was killed."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import yaml

from pipeline import artifacts, ray_runtime
from pipeline.common import StageError
from pipeline.params_file import load_params
from pipeline.sessions import NonFiniteLossError
from pipeline.tune import sweep as tune_stage
from tests.fixtures.arrays import write_square_arrays
from tests.fixtures.faults import epoch_recording_trial_function

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
TRAIN, VALID, TEST = 256, 64, 64
# Two schedule families with their own parameters; a learning rate of 1e-5 barely learns in 3 epochs of 8
# steps.
SPACE = {
    "beta_schedule": {
        "constant": {"beta": {"low": 0.5, "high": 2.0}},
        "cyclical": {"num_cycles": {"low": 1, "high": 3}},
    },
    "latent_dim": {"choices": [2, 8]},
    "learning_rate": {"choices": [1.0e-5, 3.0e-3]},
}
# Seeded TPE (random start-up phase) draws learning rates 3e-3, 3e-3, 1e-5, 1e-5 for the first four trials, so
# trials 3 and 4 reach ASHA's first rung (epoch 1) after two good trials recorded theirs, and are stopped
# there.
SEED = 4
# Spare the 2-core machine one actor process per trial (Ray Train's spot-instance preemption watcher).
RAY_ENV = {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


def write_arrays(root: Path) -> None:
    """Tiny structured Fashion-MNIST-shaped uint8 arrays in the preprocess stage's layout."""
    write_square_arrays(
        root / "data" / "processed" / "fashion_mnist", {"train": TRAIN, "valid": VALID, "test": TEST}
    )


def sweep_values(**overrides) -> dict:
    values = {
        "data.dataset": "fashion_mnist",
        "model.architecture": "mlp",
        "model.hidden_dims": [64, 32],
        "model.likelihood": "bernoulli",
        "train.batch_size": 32,
        "train.log_every_n_steps": 4,
        "train.max_failures": 0,
        "evaluate.num_image_rows": 4,
        "mlflow.experiment_name": "test-train",
        "tune.experiment_name": "test-sweep",
        "tune.num_samples": 4,
        "tune.max_concurrent_trials": 2,
        "tune.epochs": 3,
        "tune.grace_period": 1,
        "tune.reduction_factor": 2,
        "tune.seed": SEED,
        "tune.cpus_per_trial_worker": 0.5,
        "tune.gpus_per_trial_worker": 0,
        "tune.search_space": SPACE,
    }
    values.update(overrides)
    return values


def read_trials(root: Path) -> list[dict]:
    import csv

    with open(root / "reports/tune/trials.csv") as handle:
        return list(csv.DictReader(handle))


def started_epochs(root: Path, trial_id: str) -> list[int]:
    """Epochs the trial's rank-0 worker started (recorded by
    tests.fixtures.faults.epoch_recording_trial_function)."""
    return sorted(int(p.name.removeprefix("epoch")) for p in (root / "epochs" / trial_id).glob("epoch*"))


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    saved = {key: os.environ.get(key) for key in RAY_ENV}
    os.environ.update(RAY_ENV)  # before ray.init: Ray's processes inherit it
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()
    for key, value in saved.items():
        os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def sweep(ray_instance, tmp_path_factory):
    """One real sweep: 4 trials of 3 epochs, 2 at a time, each a 1-worker Ray Train run on the CPU."""
    root = tmp_path_factory.mktemp("sweep")
    write_arrays(root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAE_PROJECT_ROOT", str(root))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("RAY_ADDRESS", raising=False)
        params = load_params(overrides=sweep_values())
        started = time.perf_counter()
        summary = tune_stage.tune_sweep(
            params, functools.partial(epoch_recording_trial_function, directory=str(root / "epochs"))
        )
        print(f"\nsweep of 4 trials took {time.perf_counter() - started:.0f}s")
        client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
        yield {
            "root": root,
            "params": params,
            "summary": summary,
            "client": client,
            "rows": read_trials(root),
        }


def test_sweep_writes_a_row_per_trial_and_the_best_params(sweep):
    root, params, rows = sweep["root"], sweep["params"], sweep["rows"]
    assert len(rows) == 4 and len({row["trial_id"] for row in rows}) == 4
    for row in rows:
        assert row["status"] in ("completed", "stopped_early"), row
        assert 1 <= int(row["epochs_run"]) <= 3
        assert row["beta_schedule"] in ("constant", "cyclical")
        # Conditional parameters: each family's own, and only those.
        assert (row["schedule.beta"] != "") == (row["beta_schedule"] == "constant")
        assert (row["schedule.num_cycles"] != "") == (row["beta_schedule"] == "cyclical")
        assert float(row["best_val_negative_elbo"]) <= float(row["final_val_negative_elbo"])
        assert math.isfinite(float(row["best_val_bits_per_dim"]))

    best_row = min(rows, key=lambda row: float(row["best_val_negative_elbo"]))
    best = yaml.safe_load((root / "reports/tune/best_params.yaml").read_text())
    assert best["trial_id"] == best_row["trial_id"] and best["metric"] == "val_negative_elbo"
    assert best["value"] == pytest.approx(float(best_row["best_val_negative_elbo"]))
    assert best["params"]["latent_dim"] == int(best_row["latent_dim"])
    assert best["params"]["learning_rate"] == pytest.approx(float(best_row["learning_rate"]))
    assert best["params"]["beta_schedule"]["name"] == best_row["beta_schedule"]

    # train.use_best_params: the train stage takes exactly that configuration.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAE_PROJECT_ROOT", str(root))
        trained = artifacts.with_best_params(
            load_params(overrides=sweep_values(**{"train.use_best_params": True}))
        )
    assert trained.model.latent_dim == best["params"]["latent_dim"]
    assert trained.train.learning_rate == pytest.approx(best["params"]["learning_rate"])
    assert trained.beta_schedule.name == best["params"]["beta_schedule"]["name"]
    assert params.train.epochs == trained.train.epochs  # the sweep's epochs do not leak into training


def test_the_sweeps_result_travels_by_its_identity_never_through_a_jobs_working_copy(sweep, tmp_path):
    """The sweep also leaves reports/tune/ in its storage folder (<storage>/tune/<sweep>/outputs/). A train
    job (VAE_SUBMITTED) reads the best values from there even when its working copy - Ray's copy of whatever
    tree was submitted - holds another sweep's best_params.yaml, refuses when the storage has none, and
    `pipeline.jobs fetch` after the sweep alone brings reports/tune/ back."""
    root, summary = sweep["root"], sweep["summary"]
    stored = root / "runs" / "tune" / summary["sweep"] / "outputs" / "reports" / "tune"
    local = root / "reports" / "tune" / "best_params.yaml"
    assert (stored / "best_params.yaml").read_bytes() == local.read_bytes()
    assert (stored / "trials.csv").read_bytes() == (root / "reports/tune/trials.csv").read_bytes()
    best = yaml.safe_load(local.read_text())["params"]

    job_copy = tmp_path / "job-working-copy"
    other = {**yaml.safe_load(local.read_text()), "params": {**best, "latent_dim": best["latent_dim"] + 7}}
    (job_copy / "reports/tune").mkdir(parents=True)
    (job_copy / "reports/tune/best_params.yaml").write_text(yaml.safe_dump(other))
    (job_copy / "data").symlink_to(root / "data")  # the same arrays (a job reads them from the bucket)
    wanted = sweep_values(**{"train.use_best_params": True, "train.storage_path": str(root / "runs")})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VAE_PROJECT_ROOT", str(job_copy))
        patch.setenv("VAE_SUBMITTED", "1")
        trained = artifacts.with_best_params(load_params(overrides=wanted))
        assert trained.model.latent_dim == best["latent_dim"]
        fetched = tmp_path / "fetched"
        sources, files = artifacts.fetch_stage_outputs(load_params(overrides=wanted), fetched)
        assert sorted(files) == ["reports/tune/best_params.yaml", "reports/tune/trials.csv"]
        assert (fetched / "reports/tune/best_params.yaml").read_bytes() == local.read_bytes()
        moved = stored.parent.parent.with_name("outputs.moved")
        stored.parent.parent.rename(moved)
        try:
            with pytest.raises(StageError, match="left no result in"):
                artifacts.with_best_params(load_params(overrides=wanted))
        finally:
            moved.rename(stored.parent.parent)


def test_mlflow_holds_the_sweep_and_every_trial_like_a_training_run(sweep):
    client, rows, summary = sweep["client"], sweep["rows"], sweep["summary"]
    experiment = client.get_experiment_by_name("test-sweep")
    parent = client.get_run(summary["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == summary["sweep"]
    assert parent.data.tags["best_trial_id"] == summary["best"]["trial_id"]
    assert parent.data.metrics["best_val_negative_elbo"] == pytest.approx(summary["best"]["value"])
    assert {"trials_table.json", "trials.csv", "best_params.yaml", "search_space.json"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }

    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_trial = {run.data.tags["trial_id"]: run for run in children}
    assert set(by_trial) == {row["trial_id"] for row in rows}
    for row in rows:
        run = by_trial[row["trial_id"]]
        assert run.info.run_id == row["mlflow_run_id"] and run.info.status != "RUNNING"
        assert run.data.tags["sweep_name"] == summary["sweep"]
        assert run.data.params["beta_schedule"] == row["beta_schedule"]
        assert run.data.params["latent_dim"] == row["latent_dim"]
        assert float(run.data.params["learning_rate"]) == pytest.approx(float(row["learning_rate"]))
        assert ("schedule.num_cycles" in run.data.params) == (row["beta_schedule"] == "cyclical")
        config = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config/params.json")
        assert config["model"]["latent_dim"] == int(row["latent_dim"]) and config["train"]["epochs"] == 3
        assert config["beta_schedule"]["name"] == row["beta_schedule"]
        epochs = int(row["epochs_run"])
        history = client.get_metric_history(run.info.run_id, "val_negative_elbo")
        assert len(history) == epochs  # one point per epoch, logged by the trial's rank-0 worker
        assert min(m.value for m in history) == pytest.approx(float(row["best_val_negative_elbo"]))
        assert client.get_metric_history(run.info.run_id, "loss"), "per-step curves"
        images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
        assert any("samples" in path for path in images) and any("reconstructions" in path for path in images)


def test_asha_stops_trials_at_the_epoch_boundary_and_closes_their_runs(sweep):
    root, client, rows = sweep["root"], sweep["client"], sweep["rows"]
    stopped = [row for row in rows if row["status"] == "stopped_early"]
    # The crafted case: trials 3 and 4 (learning rate 1e-5) are worse than both trials already at rung 1.
    assert [float(row["learning_rate"]) for row in rows] == [3e-3, 3e-3, 1e-5, 1e-5], (
        "the seeded draws changed"
    )
    assert {row["trial_id"] for row in rows[2:]} <= {row["trial_id"] for row in stopped}
    for row in rows[2:]:
        assert int(row["epochs_run"]) == 1
    for row in rows:
        # No extra epoch: the epochs the workers started are exactly the epochs reported to Tune.
        assert started_epochs(root, row["trial_id"]) == list(range(1, int(row["epochs_run"]) + 1)), row
        run = client.get_run(row["mlflow_run_id"])
        if row["status"] == "stopped_early":
            assert run.info.status == "KILLED" and run.data.tags["stopped_early"] == "true"
        else:
            assert run.info.status == "FINISHED" and run.data.tags["stopped_early"] == "false"
        assert run.data.tags["epochs_run"] == row["epochs_run"]
        checkpoints = sorted(
            (root / "runs/tune" / sweep["summary"]["sweep"] / "trials").glob(
                f"*-{row['trial_id']}/checkpoint_epoch_*"
            )
        )
        assert checkpoints and checkpoints[-1].name == f"checkpoint_epoch_{int(row['epochs_run']):04d}"


def experiment_statuses(experiment_dir: Path) -> dict[str, str]:
    """Trial id -> status in the newest experiment state Tune saved (what a restore starts from)."""
    states = sorted(experiment_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):  # being rewritten
        return {}
    return {json.loads(state)["trial_id"]: json.loads(state)["status"] for state, _ in data["trial_data"]}


def checkpointed_epoch(experiment_dir: Path, trial_id: str) -> int:
    """The latest epoch the trial's Train run checkpointed (0: none yet)."""
    names = [p.name for p in (experiment_dir / "trials").glob(f"*-{trial_id}/checkpoint_epoch_*")]
    return max((int(name.rsplit("_", 1)[1]) for name in names), default=0)


def test_a_killed_driver_resumes_and_finishes_only_the_unfinished_trials(tmp_path):
    epochs = 4
    write_arrays(tmp_path)
    raw: dict = {}
    for dotted, value in sweep_values(
        **{
            "tune.num_samples": 3,
            "tune.epochs": epochs,
            "tune.grace_period": epochs,
            "tune.seed": 0,
            "train.batch_size": 16,
            "tune.experiment_name": "crash-sweep",
        }
    ).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {**os.environ, **RAY_ENV, "VAE_PROJECT_ROOT": str(tmp_path)}
    for key in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        env.pop(key, None)
    command = [sys.executable, "-m", "pipeline.tune", "--params", str(tmp_path / "params.yaml")]
    log = open(tmp_path / "first_run.log", "w")
    first = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    tune_dir = tmp_path / "runs" / "tune"
    statuses: dict[str, str] = {}
    interrupted: dict[str, int] = {}
    try:
        # Kill the driver once Tune has saved a finished trial and another trial is between two epochs.
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and first.poll() is None:
            experiments = list(tune_dir.glob("crash-sweep-*"))
            statuses = experiment_statuses(experiments[0]) if experiments else {}
            if "TERMINATED" in statuses.values():
                interrupted = {
                    trial: checkpointed_epoch(experiments[0], trial)
                    for trial, status in statuses.items()
                    if status != "TERMINATED"
                }
                if any(0 < epoch < epochs for epoch in interrupted.values()):
                    break
            time.sleep(0.2)
        assert first.poll() is None, (
            f"the sweep ended before it was killed:\n{(tmp_path / 'first_run.log').read_text()[-3000:]}"
        )
        os.kill(first.pid, signal.SIGKILL)  # the driver crashes; its Ray instance and trials go with it
        first.wait(30)
        print(f"\nkilled the driver: trials {statuses}, interrupted at checkpointed epochs {interrupted}")
    finally:
        log.close()
        _end_process_group(first)
    assert any(0 < epoch < epochs for epoch in interrupted.values()), (
        f"no trial was caught mid-training: {statuses}"
    )
    finished_before = {trial for trial, status in statuses.items() if status == "TERMINATED"}
    experiment_dir = next(tune_dir.glob("crash-sweep-*"))
    checkpoints_before = {
        trial: sorted(p.name for p in (experiment_dir / "trials").glob(f"*-{trial}/checkpoint_epoch_*"))
        for trial in finished_before
    }

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-5000:]
    assert "resuming sweep" in output and "resumed from the checkpoint of epoch" in output

    rows = read_trials(tmp_path)
    assert len(rows) == 3 and all(
        row["status"] == "completed" and row["epochs_run"] == str(epochs) for row in rows
    ), rows
    assert finished_before | set(interrupted) <= {row["trial_id"] for row in rows}
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents = client.search_runs(
        [client.get_experiment_by_name("crash-sweep").experiment_id],
        filter_string="tags.sweep_role = 'parent'",
    )
    assert (
        len(parents) == 1 and parents[0].info.status == "FINISHED"
    )  # the same parent run, reopened and closed
    for row in rows:
        run = client.get_run(row["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_negative_elbo"))
        assert len(set(steps)) == epochs, steps
        if row["trial_id"] in finished_before:
            # Not run again: no epoch logged twice, no new checkpoint written.
            assert len(steps) == epochs, steps
            assert (
                sorted(
                    p.name
                    for p in (experiment_dir / "trials").glob(f"*-{row['trial_id']}/checkpoint_epoch_*")
                )
                == checkpoints_before[row["trial_id"]]
            )
        elif interrupted.get(row["trial_id"]):
            # Resumed from its last checkpoint: at most the epoch cut short by the crash is logged twice.
            assert len(steps) <= epochs + 1, steps


def test_a_trial_that_diverged_is_not_trained_again_when_the_sweep_resumes(tmp_path, monkeypatch):
    """Tune's restore re-runs errored trials (resume_errored: those a dead node ended); a trial that diverged
    - the one deliberate trial error - fails again at once, before any training or logging (it would diverge
    again and log its steps twice)."""
    import ray.tune

    params = load_params(overrides=sweep_values())
    sweep = tune_stage.Sweep(name="sweep-x", base=params, processed_dir=str(tmp_path),
                             trials_storage=str(tmp_path / "trials"), runs=None, coordinator="nobody",
                             decision_timeout_s=1.0, use_gpu=False)
    record = tmp_path / "trials" / "sweep-x-t1" / ray_runtime.NON_FINITE_FILE
    record.parent.mkdir(parents=True)
    record.write_text("epoch 2, step 9: loss=nan")

    def started(*args, **kwargs):
        raise AssertionError("the diverged trial was started again")

    monkeypatch.setattr(ray.tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(tune_stage, "actor", started)
    monkeypatch.setattr(tune_stage.ray_runtime, "make_trainer", started)
    config = {"beta_schedule": "constant", "constant": {"beta": 1.0}, "latent_dim": 2, "learning_rate": 1e-3}
    with pytest.raises(NonFiniteLossError, match=r"t1 diverged in an earlier attempt .*step 9: loss=nan"):
        tune_stage.run_trial(config, sweep)


def _end_process_group(process: subprocess.Popen) -> None:
    """End what the killed driver's process group left behind (the test started it): its trial workers exit
    with its raylet within seconds, but Ray's dashboard and runtime-env agents linger."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_only_if_used_records_that_no_sweep_was_wanted(tmp_path, monkeypatch):
    """The DVC stage (`--only-if-used`) sweeps only for a train stage that uses the result."""
    monkeypatch.setenv("VAE_PROJECT_ROOT", str(tmp_path))
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"train": {"use_best_params": False}}))
    assert tune_stage.main(["--params", str(path), "--only-if-used"]) == 0
    assert yaml.safe_load((tmp_path / "reports/tune/best_params.yaml").read_text())["skipped"] is True
    assert read_trials(tmp_path) == []
    # Switching use_best_params on without a sweep is an error, not a silent no-op.
    with pytest.raises(StageError, match="no sweep result"):
        artifacts.with_best_params(load_params(path, overrides={"train.use_best_params": True}))


@pytest.mark.parametrize(
    "space, field",
    [
        (
            {"beta_schedule": {"cyclical": {"ratio": {"low": 0.5, "high": 2.0}}}},
            "tune.search_space.beta_schedule.cyclical",
        ),
        (
            {"beta_schedule": {"constant": {"num_cycles": 3}}},
            "tune.search_space.beta_schedule.constant.num_cycles",
        ),
        ({"beta_schedule": {"warmup": {}}}, "tune.search_space.beta_schedule.warmup"),
        ({"learning_rate": {"low": 0.0, "high": 0.01, "log": True}}, "tune.search_space.learning_rate"),
        ({"latent_dim": {"choices": []}}, "tune.search_space.latent_dim"),
    ],
)
def test_an_invalid_search_space_fails_naming_the_field(tmp_path, capsys, space, field):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"tune": {"search_space": space}}))
    assert tune_stage.main(["--params", str(path)]) == 1
    assert field in capsys.readouterr().err


@pytest.mark.parametrize(
    "resources, settings, expected",
    [
        # One GPU box (16 cores): 4 trials share the GPU at 0.25 GPU per trial worker.
        ({"CPU": 16.0, "GPU": 1.0}, {}, (True, 4)),
        # The 2-core CPU machine: the GPU fraction is ignored; 1 CPU per worker + the trial driver's 0.05 -> 1
        # trial.
        ({"CPU": 2.0}, {}, (False, 1)),
        ({"CPU": 2.0}, {"tune.cpus_per_trial_worker": 0.5}, (False, 3)),
        (
            {"CPU": 8.0, "GPU": 2.0},
            {"tune.workers_per_trial": 2, "tune.gpus_per_trial_worker": 0.5},
            (True, 2),
        ),
        ({"CPU": 16.0, "GPU": 1.0}, {"tune.max_concurrent_trials": 2}, (True, 2)),
        ({"CPU": 16.0, "GPU": 1.0}, {"train.use_gpu": False}, (False, 15)),
    ],
)
def test_concurrent_trials_follow_the_cluster_resources(monkeypatch, resources, settings, expected):
    monkeypatch.setattr(tune_stage.ray, "cluster_resources", lambda: resources)
    params = load_params(overrides={"tune.num_samples": 16, **settings})
    assert tune_stage.trial_resources(params) == expected


def test_gpus_required_but_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(tune_stage.ray, "cluster_resources", lambda: {"CPU": 4.0})
    with pytest.raises(tune_stage.StageError, match="tune.gpus_per_trial_worker"):
        tune_stage.trial_resources(load_params(overrides={"train.use_gpu": True}))
