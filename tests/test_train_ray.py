"""The train and evaluate stages on a real local Ray instance, tracked in a real MLflow (SQLite) store."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from pipeline import artifacts, checkpoints, fid
from pipeline import evaluate as evaluate_stage
from pipeline import train as train_stage
from pipeline.params_file import load_params
from tests.fixtures.arrays import write_square_arrays
from tests.fixtures.faults import faulty_train_function
from tests.fixtures.features import stand_in

pytestmark = pytest.mark.slow

# The test split differs from the validation split in size and content: a stage that read the wrong one fails.
TRAIN, VALID, TEST = 256, 64, 40
BRIGHTNESS = {"train": 200, "valid": 200, "test": 120}


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
    write_square_arrays(
        tmp_path / "data" / "processed" / "fashion_mnist",
        {"train": TRAIN, "valid": VALID, "test": TEST},
        BRIGHTNESS,
    )
    return tmp_path


def params_for(workspace, **overrides):
    values = {
        "data.dataset": "fashion_mnist",
        "model.architecture": "mlp",
        "model.hidden_dims": [64, 32],
        "model.latent_dim": 4,
        "model.likelihood": "bernoulli",
        "beta_schedule": {"name": "linear", "warmup_steps": 4},
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.num_workers": 2,
        "train.log_every_n_steps": 2,
        "train.max_failures": 0,
        "train.run_name": "test",
        "mlflow.experiment_name": "test-train",
        "mlflow.registered_model_name": "test-vae",
        "evaluate.num_importance_samples": 64,
        "evaluate.importance_batch_size": 32,
        "evaluate.num_image_rows": 4,
    }
    values.update(overrides)
    return load_params(overrides=values)


def test_two_worker_run_tracks_everything_and_evaluates(ray_instance, workspace, monkeypatch):
    monkeypatch.setattr(fid, "load_inception", lambda device: stand_in())  # no Inception download here
    params = params_for(workspace, **{"evaluate.fid": True, "evaluate.fid_num_samples": 40})
    metrics = train_stage.train(params)

    # DVC outputs.
    assert (workspace / "models/vae/model.safetensors").is_file()
    curves = (workspace / "reports/train_curves.csv").read_text().strip().splitlines()
    assert len(curves) == 1 + 2 and curves[0].startswith("epoch,")
    assert json.loads((workspace / "reports/train_metrics.json").read_text())["epochs"] == 2

    # MLflow: one run with per-step and per-epoch histories, images, and a loadable registered model.
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    run = client.get_run(metrics["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["latent_dim"] == "4" and run.data.tags["dataset"] == "fashion_mnist"
    steps_per_epoch = (TRAIN // 2) // (32 // 2)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 2 * steps_per_epoch // 2
    for key in ("val_negative_elbo", "val_bits_per_dim", "train_kl"):
        assert len(client.get_metric_history(run.info.run_id, key)) == 2, key
    assert {m.key for m in client.get_metric_history(run.info.run_id, "images_per_s")}
    assert len(client.get_metric_history(run.info.run_id, "epoch_images_per_s")) == 2
    for key in run.data.metrics:  # one value per step and metric (epoch 1 ends on a logged step)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, steps)
    images = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    for key in ("samples", "reconstructions", "traversals"):
        assert any(key in path for path in images), (key, images)
    mlflow.set_tracking_uri(f"sqlite:///{workspace / 'mlflow.db'}")
    loaded = mlflow.pytorch.load_model("models:/test-vae/1")
    assert loaded.sample(3).shape == (3, 1, 28, 28)

    # Evaluate stage on the trained model: metrics file, pictures, and the same figures in the run.
    figures = evaluate_stage.evaluate(params)
    saved = json.loads((workspace / "reports/metrics.json").read_text())
    assert saved["num_test_images"] == TEST and saved["num_importance_samples"] == 64
    test_images = np.load(workspace / "data/processed/fashion_mnist/test_images.npy")
    direct = evaluate_stage.test_figures(
        artifacts.load_trained_model(), test_images, 64, 32, 256, torch.device("cpu"), seed=params.train.seed
    )
    for key in ("test_negative_elbo", "test_nll", "test_reconstruction_mse"):  # computed on the test split
        assert saved[key] == pytest.approx(direct[key], rel=1e-5), key
    assert saved["test_nll"] <= saved["test_negative_elbo"] + 1e-3  # IWAE-64 bound is tighter than the ELBO
    assert figures["test_nll_bits_per_dim"] == pytest.approx(figures["test_nll"] / (784 * np.log(2)))
    for name in ("samples", "reconstructions", "interpolations", "traversals"):
        assert (workspace / "reports/eval" / f"{name}.png").is_file()
    history = client.get_metric_history(run.info.run_id, "test_nll")
    assert history and history[0].value == pytest.approx(saved["test_nll"], rel=1e-6)
    # FID through the stage's whole path (stand-in features): samples and reconstructions, cached reference.
    assert saved["fid_num_samples"] == 40 and saved["fid_reference_images"] == TEST
    assert saved["fid_samples"] > 0 and saved["fid_reconstructions"] > 0
    assert saved["fid_feature_extractor"] == "stand-in" and list((workspace / ".cache/fid").glob("*.npz"))
    assert client.get_metric_history(run.info.run_id, "fid_samples")

    # Two NLL workers (Ray tasks): the same figures; FID off says so.
    two = evaluate_stage.evaluate(params_for(workspace, **{"evaluate.num_workers": 2, "evaluate.fid": False}))
    assert two["num_workers"] == 2 and two["fid_skipped"] == "evaluate.fid is false"
    for key in ("test_negative_elbo", "test_nll", "test_reconstruction_mse", "active_units"):
        assert two[key] == pytest.approx(saved[key], rel=1e-6), key


def test_nan_stops_the_run_at_once_and_a_rerun_is_refused_until_something_changes(ray_instance, workspace):
    """A divergence is not retried, whatever train.max_failures (here its default, 2): it would only
    repeat. A re-run of the same settings is refused too (it would diverge again, and log the steps after its
    last checkpoint a second time), naming what to change; deleting the run as it says trains afresh."""
    params = params_for(workspace, **{"train.num_workers": 1, "train.epochs": 3, "train.max_failures": 2})
    steps_per_epoch = TRAIN // 32
    starts = workspace / "starts"
    with pytest.raises(
        train_stage.StageError,
        match=rf"diverged .*epoch 2, step {steps_per_epoch + 1}: loss=nan.*learning_rate",
    ):
        train_stage.train(
            params,
            functools.partial(faulty_train_function, starts_dir=str(starts), nan_call=steps_per_epoch + 1),
        )
    assert len(list(starts.iterdir())) == 1, "the diverged worker was started again"
    run_dirs = list((workspace / "runs").iterdir())
    assert len(run_dirs) == 1
    checkpoints = sorted(p.name for p in run_dirs[0].glob("checkpoint_epoch_*"))
    assert checkpoints == ["checkpoint_epoch_0001"]
    state = torch.load(run_dirs[0] / checkpoints[0] / "state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    failed_run = (run_dirs[0] / "mlflow_run_id").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    logged = [(m.step, m.value) for m in client.get_metric_history(failed_run, "loss")]
    assert client.get_run(failed_run).info.status == "FAILED"

    with pytest.raises(train_stage.StageError, match=rf"diverged before .*not resumed.*learning_rate.*delete "
                                                     rf"{run_dirs[0]}"):
        train_stage.train(params)  # the same settings: refused before any training
    assert [(m.step, m.value) for m in client.get_metric_history(failed_run, "loss")] == logged
    assert sorted(p.name for p in run_dirs[0].glob("checkpoint_epoch_*")) == checkpoints

    shutil.rmtree(run_dirs[0])  # what the message offers: these settings from scratch, in a new MLflow run
    metrics = train_stage.train(params)
    assert metrics["epochs"] == 3 and metrics["steps"] == 3 * steps_per_epoch
    assert metrics["mlflow_run_id"] != failed_run
    steps = [m.step for m in client.get_metric_history(metrics["mlflow_run_id"], "loss")]
    assert len(steps) == len(set(steps)) == 3 * steps_per_epoch // params.train.log_every_n_steps


# Another valid value for every train setting (a new setting must be added here, and so classified).
OTHER_TRAIN_VALUES = {
    "epochs": 5,
    "batch_size": 64,
    "optimizer": "adam",
    "learning_rate": 2e-3,
    "weight_decay": 0.1,
    "lr_schedule": "cosine",
    "lr_warmup_steps": 7,
    "grad_clip_norm": 5.0,
    "num_mc_samples": 2,
    "seed": 3,
    "precision": "bf16",
    "num_workers": 4,
    "min_workers": 1,
    "use_gpu": False,
    "cpus_per_worker": 3.0,
    "gpus_per_worker": 0.5,
    "data_on_device": "never",
    "channels_last": False,
    "compile": True,
    "checkpoint_num_to_keep": 5,
    "max_failures": 3,
    "storage_path": "elsewhere",
    "run_name": "other",
    "log_every_n_steps": 7,
    "print_steps": True,
    "use_best_params": True,
    "max_steps_per_epoch": 3,
}


def test_run_name_changes_exactly_with_what_changes_the_weights(workspace):
    """Re-running after a crash on other resources (or another number of workers) resumes the same run; a
    setting that changes the weights starts a new one."""
    from pipeline.config import RUN_IDENTITY_EXCLUDES, TrainConfig

    def digest(params, hashes=None) -> str:
        return train_stage.run_name(params, hashes or {}).rsplit("-", 1)[1]

    assert set(OTHER_TRAIN_VALUES) == set(TrainConfig.model_fields)
    base_params = params_for(workspace)
    base = digest(base_params)
    for field, value in OTHER_TRAIN_VALUES.items():
        assert getattr(base_params.train, field) != value, field
        changed = digest(params_for(workspace, **{f"train.{field}": value})) != base
        assert changed == (field not in RUN_IDENTITY_EXCLUDES), field
    assert digest(params_for(workspace, **{"model.latent_dim": 8})) != base
    assert digest(base_params, {"data.sha256.train_images.npy": "x"}) != base
    # The same arrays elsewhere (the workspace, a bucket) are the same run; without hashes the place decides.
    hashes = {"data.sha256.train_images.npy": "x"}
    moved = params_for(workspace, **{"data.processed_dir": "s3://vae/runs/data/0123456789abcdef"})
    assert digest(moved, hashes) == digest(base_params, hashes)
    assert digest(moved) != base


def test_crash_right_after_a_checkpoint_resumes_from_that_checkpoint(ray_instance, workspace):
    """The worker process dies the moment epoch 1's checkpoint is written, before Ray's controller has polled
    it (it polls every ~2 s): the restarted worker still resumes from epoch 1, not from scratch."""
    params = params_for(workspace, **{"train.num_workers": 1, "train.epochs": 3, "train.max_failures": 1})
    steps_per_epoch = TRAIN // 32
    metrics = train_stage.train(params, functools.partial(faulty_train_function, exit_after_epoch=1))
    assert metrics["epochs"] == 3 and metrics["steps"] == 3 * steps_per_epoch
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    history = client.get_metric_history(metrics["mlflow_run_id"], "val_negative_elbo")
    assert sorted(m.step for m in history) == [steps_per_epoch * e for e in (1, 2, 3)]  # epoch 1 trained once
    run_dir = next((workspace / "runs").iterdir())
    assert sorted(p.name for p in run_dir.glob("checkpoint_epoch_*")) == [
        "checkpoint_epoch_0002",
        "checkpoint_epoch_0003",
    ]


def test_a_crash_mid_epoch_logs_every_step_once(ray_instance, workspace):
    """The worker dies in the middle of epoch 2, after logging steps of it; the restarted worker trains those
    steps again from epoch 1's checkpoint, with other values. MLflow ends with one value per logged step and
    per epoch: what the dead attempt logged after its last checkpoint was never sent."""
    params = params_for(workspace, **{"train.num_workers": 1, "train.epochs": 3, "train.max_failures": 1})
    steps_per_epoch = TRAIN // 32
    starts = workspace / "starts"
    metrics = train_stage.train(params, functools.partial(
        faulty_train_function, starts_dir=str(starts), exit_call=steps_per_epoch + 5))
    assert len(list(starts.iterdir())) == 2 and metrics["steps"] == 3 * steps_per_epoch
    client = mlflow.MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    steps = [m.step for m in client.get_metric_history(metrics["mlflow_run_id"], "loss")]
    assert sorted(steps) == list(range(2, 3 * steps_per_epoch + 1, 2))  # train.log_every_n_steps = 2
    epochs = [m.step for m in client.get_metric_history(metrics["mlflow_run_id"], "val_negative_elbo")]
    assert sorted(epochs) == [steps_per_epoch * e for e in (1, 2, 3)]


def _write_checkpoint(run_dir, epoch, *, recorded_epoch=None, truncate=False):
    from pipeline.checkpoints import save_state

    path = save_state(
        {"epoch": recorded_epoch or epoch, "step": 10 * epoch}, run_dir / f"checkpoint_epoch_{epoch:04d}"
    )
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
    path, state = checkpoints.newest_persisted_checkpoint(fs, str(tmp_path))
    assert path.endswith("checkpoint_epoch_0002") and state == {"epoch": 2, "step": 20}
    assert checkpoints.newest_persisted_checkpoint(fs, str(tmp_path), newer_than=2) is None
    assert checkpoints.newest_persisted_checkpoint(fs, str(tmp_path / "missing")) is None


def test_final_state_takes_an_unregistered_newer_checkpoint_and_prunes_old_orphans(tmp_path):
    from types import SimpleNamespace

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    registered = [Checkpoint(str(_write_checkpoint(tmp_path, e))) for e in (2, 3)]
    orphan = _write_checkpoint(tmp_path, 1)  # written, never registered, older than what Ray kept
    result = SimpleNamespace(
        best_checkpoints=[(c, {}) for c in registered],
        checkpoint=registered[-1],
        filesystem=pafs.LocalFileSystem(),
        path=str(tmp_path),
    )
    assert checkpoints.final_state(result)["epoch"] == 3
    assert not orphan.exists() and all(Path(c.path).is_dir() for c in registered)

    _write_checkpoint(
        tmp_path, 4
    )  # the last epoch's checkpoint, written but not registered when the run ended
    assert checkpoints.final_state(result)["epoch"] == 4
    result.checkpoint, result.best_checkpoints = None, []
    assert checkpoints.final_state(result)["epoch"] == 4
    for child in tmp_path.iterdir():
        shutil.rmtree(child)
    assert checkpoints.final_state(result) is None


def test_the_mlflow_ui_shows_the_runs_table_the_elbo_chart_and_the_pictures(ray_instance, workspace):
    """The MLflow UI as a user sees it, in a real browser: the experiment opens on its runs table (not MLflow
    3's GenAI overview), the run's ELBO chart draws its series, and the evaluate stage's samples are a
    picture of the logged size in view; the run logs the compared parameters only, the whole configuration
    as one artifact, and the registered version carries the best-test-NLL alias."""
    from PIL import Image
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from pipeline.tracking import BEST_ALIAS, CONFIG_ARTIFACT, EXPERIMENT_KIND_TAG, ui_url
    from pipeline.ui_screenshot import mlflow_ui
    from tests.fixtures.browser import headless_chromium, in_view

    params = params_for(workspace, **{"train.num_workers": 1, "evaluate.fid": False,
                                      "evaluate.num_importance_samples": 8})
    run_id = train_stage.train(params)["mlflow_run_id"]
    evaluate_stage.evaluate(params)
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND_TAG[0]] == EXPERIMENT_KIND_TAG[1]
    assert run.data.params == {
        "dataset": "fashion_mnist", "architecture": "mlp", "likelihood": "bernoulli", "latent_dim": "4",
        "beta_schedule": "linear", "schedule.beta_max": "1.0", "schedule.warmup_steps": "4",
        "schedule.start_step": "0", "learning_rate": "0.001", "batch_size": "32", "epochs": "2",
    }
    config = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{CONFIG_ARTIFACT}")
    assert config == params.model_dump(mode="json")
    assert client.get_model_version_by_alias("test-vae", BEST_ALIAS).run_id == run_id
    samples = next(a.path for a in client.list_artifacts(run_id, "images")
                   if a.path.startswith("images/eval_samples") and a.path.endswith(".png"))
    with Image.open(client.download_artifacts(run_id, samples, str(workspace))) as picture:
        logged_size = picture.size

    def visible(browser, xpath: str):
        return next((e for e in browser.find_elements(By.XPATH, xpath) if e.is_displayed()), None)

    with mlflow_ui(uri, workspace / "mlflow-server.log") as base, headless_chromium() as browser:
        wait = WebDriverWait(browser, 90, poll_frequency=0.5)
        try:
            # The experiment: its runs table, with the run in it.
            browser.get(ui_url(base, experiment.experiment_id))
            wait.until(lambda b: visible(b, f"//a[normalize-space()='{run.info.run_name}']"))
            assert "/runs" in browser.current_url and "overview" not in browser.current_url

            # The run's ELBO chart: one series through both epochs' values.
            browser.get(ui_url(base, experiment.experiment_id, run_id, "model-metrics"))
            search = wait.until(lambda b: visible(b, "//input[@placeholder='Search metric charts']"))
            search.send_keys("val_negative_elbo")
            title = wait.until(lambda b: visible(b, "//h4[normalize-space()='val_negative_elbo']"))
            line = wait.until(lambda b: next(iter(title.find_elements(
                By.XPATH, "./ancestor::div[.//div[contains(@class,'js-plotly-plot')]][1]"
                          "//*[contains(@class,'trace')]//*[contains(@class,'js-line')]")), None))
            card = line.find_element(By.XPATH, "./ancestor::div[.//h4][1]")
            assert line.get_attribute("d").count("L") == 1  # two points: epochs 1 and 2
            plot = line.find_element(By.XPATH, "./ancestor::div[contains(@class,'js-plotly-plot')][1]")
            assert run.info.run_name in card.text and in_view(browser, plot)

            # The evaluate stage's samples: the card's picture in view; the full picture at its logged size.
            search.send_keys(Keys.CONTROL, "a")  # the input is React's: clear() leaves its state as it was
            search.send_keys(Keys.DELETE, "eval_samples")
            title = wait.until(lambda b: visible(b, "//h4[normalize-space()='eval_samples']"))
            card = title.find_element(By.XPATH, "./ancestor::div[.//img][1]")
            image = wait.until(
                lambda b: next(iter(card.find_elements(By.CSS_SELECTOR, "img.rc-image-img")), None))

            def loaded_and_in_view(b) -> bool:
                # The page brings the card into view (again on each try: cards shift as pictures load); the
                # card's own scroller stays where it opens. MLflow's card at its default size shows the top of
                # a square picture under the params caption (expand the card to see all of it): the picture
                # must begin in view there, not below the fold of the card.
                b.execute_script("arguments[0].scrollIntoView({block: 'center'})", card)
                return int(image.get_attribute("naturalWidth") or 0) > 0 and in_view(b, image, depth=0.1)

            wait.until(loaded_and_in_view)
            image.click()
            preview = wait.until(lambda b: visible(b, "//img[contains(@class,'rc-image-preview-img')]"))

            def preview_size() -> tuple[int, int]:
                return (int(preview.get_attribute("naturalWidth") or 0),
                        int(preview.get_attribute("naturalHeight") or 0))

            # The card shows MLflow's compressed thumbnail (256 px on its longer side); the preview swaps in
            # the full picture once it has loaded, and until then the element may still hold the thumbnail.
            # So wait for the full picture: a preview that never shows it times out here with its last size.
            try:
                WebDriverWait(browser, 30, poll_frequency=0.25).until(lambda b: preview_size() == logged_size)
            except TimeoutException:
                source = preview.get_attribute("src")
                raise AssertionError(f"the preview shows {preview_size()} from {source},"
                                     f" not the logged picture at {logged_size}") from None
            assert in_view(browser, preview)
        except Exception:
            browser.save_screenshot(str(workspace / "mlflow-ui-failure.png"))
            print(f"screenshot of the failing page: {workspace / 'mlflow-ui-failure.png'}")
            raise
