"""The train and evaluate stages on a real local Ray instance, tracked in a real MLflow (SQLite) store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline import evaluate as evaluate_stage
from pipeline import train as train_stage
from pipeline.config import load_params
from tests.fixtures.arrays import write_square_arrays

pytestmark = pytest.mark.slow

TRAIN, VALID, TEST = 256, 64, 64


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A project root with tiny structured Fashion-MNIST-shaped arrays in the preprocess stage's layout."""
    monkeypatch.setenv("VAE_PROJECT_ROOT", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_square_arrays(tmp_path / "data" / "processed" / "fashion_mnist", {"train": TRAIN, "valid": VALID, "test": TEST})
    return tmp_path


def params_for(workspace, **overrides):
    values = {
        "data.dataset": "fashion_mnist", "model.architecture": "mlp", "model.hidden_dims": [64, 32], "model.latent_dim": 4,
        "model.likelihood": "bernoulli", "beta_schedule": {"name": "linear", "warmup_steps": 4},
        "train.epochs": 2, "train.batch_size": 32, "train.num_workers": 2, "train.log_every_n_steps": 2,
        "train.max_failures": 0, "train.run_name": "test", "mlflow.experiment_name": "test-train",
        "mlflow.registered_model_name": "test-vae", "evaluate.num_importance_samples": 64,
        "evaluate.importance_batch_size": 32, "evaluate.num_image_rows": 4,
    }
    values.update(overrides)
    return load_params(overrides=values)


def test_two_worker_run_tracks_everything_and_evaluates(ray_instance, workspace):
    params = params_for(workspace)
    metrics = train_stage.train(params, {"record_indices_dir": str(workspace / "indices")})

    # Both DDP ranks trained on disjoint halves of the split, the same number of images each.
    for epoch in range(2):
        rank0 = np.load(workspace / "indices" / f"rank0_epoch{epoch}.npy")
        rank1 = np.load(workspace / "indices" / f"rank1_epoch{epoch}.npy")
        assert len(rank0) == len(rank1) == TRAIN // 2
        assert not set(rank0) & set(rank1)

    # DVC outputs.
    assert (workspace / "models/vae/model.safetensors").is_file()
    curves = (workspace / "reports/train_curves.csv").read_text().strip().splitlines()
    assert len(curves) == 1 + 2 and curves[0].startswith("epoch,")
    assert json.loads((workspace / "reports/train_metrics.json").read_text())["epochs"] == 2

    # MLflow: one run with per-step and per-epoch histories, images, and a loadable registered model.
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.latent_dim"] == "4" and run.data.tags["dataset"] == "fashion_mnist"
    steps_per_epoch = (TRAIN // 2) // (32 // 2)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2 * steps_per_epoch // 2
    for key in ("val_negative_elbo", "val_bits_per_dim", "train_kl"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert {m.key for m in client.get_metric_history(run.info.run_id, "images_per_s")}
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    for key in ("samples", "reconstructions", "traversals"):
        assert any(key in path for path in artifacts), (key, artifacts)
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    loaded = mlflow.pytorch.load_model("models:/test-vae/1")
    assert loaded.sample(3).shape == (3, 1, 28, 28)

    # Evaluate stage on the trained model: metrics file, pictures, and the same figures in the run.
    figures = evaluate_stage.evaluate(params)
    saved = json.loads((workspace / "reports/metrics.json").read_text())
    assert saved["num_test_images"] == TEST and saved["num_importance_samples"] == 64
    assert saved["test_nll"] <= saved["test_negative_elbo"] + 1e-3  # IWAE-64 bound is tighter than the ELBO
    assert figures["test_nll_bits_per_dim"] == pytest.approx(figures["test_nll"] / (784 * np.log(2)))
    for name in ("samples", "reconstructions", "interpolations", "traversals"):
        assert (workspace / "reports/eval" / f"{name}.png").is_file()
    history = client.get_metric_history(run.info.run_id, "test_nll")
    assert history and history[0].value == pytest.approx(saved["test_nll"], rel=1e-6)


def test_nan_stops_the_run_and_a_rerun_resumes(ray_instance, workspace):
    params = params_for(workspace, **{"train.num_workers": 1, "train.epochs": 3})
    steps_per_epoch = TRAIN // 32
    with pytest.raises(train_stage.StageError, match="NonFiniteLossError|not finite|loss=nan"):
        train_stage.train(params, {"fault_injection": {"nan_at_step": steps_per_epoch + 1}})
    run_dirs = list((workspace / "runs").iterdir())
    assert len(run_dirs) == 1
    checkpoints = sorted(p.name for p in run_dirs[0].glob("checkpoint_epoch_*"))
    assert checkpoints == ["checkpoint_epoch_0001"]
    state = torch.load(run_dirs[0] / checkpoints[0] / "state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    failed_run = (run_dirs[0] / "mlflow_run_id").read_text()

    metrics = train_stage.train(params)  # same config: resumes the run from epoch 1
    assert metrics["epochs"] == 3 and metrics["steps"] == 3 * steps_per_epoch
    assert metrics["mlflow_run_id"] == failed_run
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    epochs_logged = [m.step for m in client.get_metric_history(failed_run, "val_negative_elbo")]
    assert sorted(epochs_logged) == [steps_per_epoch * e for e in (1, 2, 3)]  # epoch 1 was not trained again


def test_changed_config_starts_a_new_run(workspace):
    a = params_for(workspace)
    b = params_for(workspace, **{"model.latent_dim": 8})
    assert train_stage.run_name(a, {}) != train_stage.run_name(b, {})
    c = params_for(workspace, **{"train.log_every_n_steps": 7})  # logging does not shape the weights
    assert train_stage.run_name(a, {}) == train_stage.run_name(c, {})


def test_crash_right_after_a_checkpoint_resumes_from_that_checkpoint(ray_instance, workspace):
    """The worker process dies the moment epoch 1's checkpoint is written, before Ray's controller has polled
    it (it polls every ~2 s): the restarted worker still resumes from epoch 1, not from scratch."""
    params = params_for(workspace, **{"train.num_workers": 1, "train.epochs": 3, "train.max_failures": 1})
    steps_per_epoch = TRAIN // 32
    metrics = train_stage.train(params, {"fault_injection": {"exit_after_epoch": 1}})
    assert metrics["epochs"] == 3 and metrics["steps"] == 3 * steps_per_epoch
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    history = client.get_metric_history(metrics["mlflow_run_id"], "val_negative_elbo")
    assert sorted(m.step for m in history) == [steps_per_epoch * e for e in (1, 2, 3)]  # epoch 1 trained once
    run_dir = next((workspace / "runs").iterdir())
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*")) == ["checkpoint_epoch_0002", "checkpoint_epoch_0003"]


def _write_checkpoint(run_dir, epoch, *, recorded_epoch=None, truncate=False):
    from pipeline.train_loop import save_state

    path = save_state({"epoch": recorded_epoch or epoch, "step": 10 * epoch}, run_dir / f"checkpoint_epoch_{epoch:04d}")
    if truncate:  # an upload cut short
        path.write_bytes(path.read_bytes()[:40])
    return path.parent


def test_newest_persisted_checkpoint_skips_incomplete_and_mislabelled_ones(tmp_path):
    import pyarrow.fs as pafs

    fs = pafs.LocalFileSystem()
    for epoch in (1, 2):
        _write_checkpoint(tmp_path, epoch)
    _write_checkpoint(tmp_path, 3, truncate=True)
    _write_checkpoint(tmp_path, 4, recorded_epoch=7)
    (tmp_path / "checkpoint_epoch_0009").mkdir()  # no state.pt at all
    path, state = train_stage.newest_persisted_checkpoint(fs, str(tmp_path))
    assert path.endswith("checkpoint_epoch_0002") and state == {"epoch": 2, "step": 20}
    assert train_stage.newest_persisted_checkpoint(fs, str(tmp_path), newer_than=2) is None
    assert train_stage.newest_persisted_checkpoint(fs, str(tmp_path / "missing")) is None


def test_final_state_takes_an_unregistered_newer_checkpoint_and_prunes_old_orphans(tmp_path):
    from types import SimpleNamespace

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    registered = [Checkpoint(str(_write_checkpoint(tmp_path, e))) for e in (2, 3)]
    orphan = _write_checkpoint(tmp_path, 1)  # written, never registered, older than what Ray kept
    result = SimpleNamespace(best_checkpoints=[(c, {}) for c in registered], checkpoint=registered[-1],
                             filesystem=pafs.LocalFileSystem(), path=str(tmp_path))
    assert train_stage.final_state(result)["epoch"] == 3
    assert not orphan.exists() and all(Path(c.path).is_dir() for c in registered)

    _write_checkpoint(tmp_path, 4)  # the last epoch's checkpoint, written but not registered when the run ended
    assert train_stage.final_state(result)["epoch"] == 4
    result.checkpoint, result.best_checkpoints = None, []
    assert train_stage.final_state(result)["epoch"] == 4
    for child in tmp_path.iterdir():
        shutil.rmtree(child)
    assert train_stage.final_state(result) is None
