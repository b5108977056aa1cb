"""pipeline.run_logger's RunLogger, the workers' non-blocking MLflow logger, against a real SQLite store and
against a server address where nothing listens; the experiment kind, the compared params and the best-test-NLL
alias of the model registry against a real SQLite store."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest

from pipeline.common import StageError
from pipeline.params_file import load_params
from pipeline.run_logger import RunLogger
from pipeline.tracking import (
    BEST_ALIAS,
    EXPERIMENT_KIND_TAG,
    compared_params,
    ensure_experiment,
    image_grid,
    promote_if_best,
    tracking_uri,
    ui_url,
)

REPO = Path(__file__).resolve().parents[1]


def test_drain_delivers_every_queued_record_before_returning(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run = client.create_run(client.create_experiment("drain"))
    logger = RunLogger(run.info.run_id, uri, tmp_path / "lost.json")
    for step in range(1, 6):
        logger.log_metrics({"loss": 10.0 / step, "beta": 0.1 * step}, step)
    logger.log_image(image_grid(np.zeros((4, 1, 28, 28), np.uint8), 2), key="samples", step=5)
    assert logger.drain(timeout_s=60)
    # Delivered now, before close: a process killed from here on has lost none of them.
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (s, 10.0 / s) for s in range(1, 6)
    ]
    assert logger.close(timeout_s=10) == {"sent_all": True, "lost_records": 0, "errors": []}
    assert not (tmp_path / "lost.json").exists()


def test_waiting_records_go_in_few_requests(tmp_path, monkeypatch):
    """A step's records are logged faster than one request each can go (a server behind basic-auth hashes the
    password on every request): what is waiting goes together, in one log_batch of up to 1,000 values."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("batched")).info.run_id
    requests = []
    real = mlflow.MlflowClient.log_batch

    def counted(self, *args, **kwargs):
        requests.append(len(kwargs.get("metrics") or []))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", counted)
    logger = RunLogger(run_id, uri, hold_until_commit=True)
    for step in range(1, 301):
        logger.log_metrics({"loss": 1.0 / step, "kl": 0.5}, step)
    logger.commit()  # an epoch's 300 records at once
    assert logger.close(timeout_s=60)["sent_all"]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 301))
    assert sum(requests) == 600 and len(requests) <= 3, requests


def test_held_records_leave_at_commit_once_and_a_resumed_attempt_logs_each_step_once(tmp_path):
    """Training holds its records until the checkpoint covering them is written; an attempt that dies before
    that sends nothing, and the checkpoint's records sent again by the next attempt stay single rows."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("held")).info.run_id

    def history():
        return [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]

    first = RunLogger(run_id, uri, hold_until_commit=True)
    first.log_metrics({"loss": 3.0}, 1)
    first.log_metrics({"loss": 2.0}, 2)
    assert first.drain(timeout_s=30) and history() == []  # held: no checkpoint yet
    checkpointed = first.held_records()  # what the epoch's checkpoint carries
    assert [r["step"] for r in checkpointed] == [1, 2]
    first.commit()
    assert first.drain(timeout_s=30) and history() == [(1, 3.0), (2, 2.0)]
    first.log_metrics({"loss": 1.9}, 3)  # after the checkpoint ...
    first.close(timeout_s=10)  # ... and the attempt dies: step 3 was never sent
    assert history() == [(1, 3.0), (2, 2.0)]

    second = RunLogger(run_id, uri, hold_until_commit=True)
    second.resend(checkpointed)  # the resumed attempt re-sends its checkpoint's records
    second.log_metrics({"loss": 1.7}, 3)  # step 3 trained again, another value
    second.commit()
    assert second.close(timeout_s=30)["sent_all"]
    assert history() == [(1, 3.0), (2, 2.0), (3, 1.7)]


def test_a_checkpoint_carries_what_was_not_sent_and_the_next_attempt_sends_it(tmp_path):
    """Epoch 1 is committed while the server is away (kept for a retry), epoch 2 is held; the attempt dies
    after epoch 2's checkpoint. The checkpoint carries both, and the next attempt sends them."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("unsent")).info.run_id
    with socket.socket() as probe:  # a port nothing listens on: the server is away
        probe.bind(("127.0.0.1", 0))
        away = f"http://127.0.0.1:{probe.getsockname()[1]}"
    first = RunLogger(run_id, away, hold_until_commit=True)
    first.log_metrics({"loss": 3.0}, 1)
    first.commit()  # epoch 1's checkpoint is written ...
    assert first.drain(timeout_s=30)  # ... but its record could not be sent
    first.log_metrics({"loss": 2.0}, 2)
    checkpointed = first.held_records()  # epoch 2's checkpoint
    assert [r["step"] for r in checkpointed] == [1, 2]
    first.close(timeout_s=0.1)  # the attempt dies

    second = RunLogger(run_id, uri, hold_until_commit=True)
    second.resend(checkpointed)
    assert second.close(timeout_s=30)["sent_all"]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 3.0), (2, 2.0)]


RESUMED_ATTEMPT = """
import sys
from pipeline.run_logger import RunLogger, start_system_metrics, stop_system_metrics
uri, run_id = sys.argv[1:]
logger = RunLogger(run_id, uri, hold_until_commit=True)
logger.resend([{"metrics": {"loss": float(s)}, "step": s, "timestamp_ms": 1000 + s} for s in range(1, 41)])
monitor = start_system_metrics(run_id, uri, 1.0)  # what train_worker does next
print(logger.close(timeout_s=30))
stop_system_metrics(monitor)
"""


def test_a_resumed_attempt_sends_its_checkpoints_records_while_the_system_monitor_starts(tmp_path):
    """A fresh process (a resumed attempt on a new worker) re-sends its checkpoint's records at once, in the
    sender thread, while the training thread starts MLflow's system-metrics monitor: both use MLflow, whose
    modules import each other in cycles. Every record arrives - none lost to a half-imported module."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("resumed")).info.run_id
    done = subprocess.run([sys.executable, "-c", RESUMED_ATTEMPT, uri, run_id], capture_output=True,
                          text=True, timeout=300, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'sent_all': True" in done.stdout, done.stdout + done.stderr[-3000:]
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 41))


def test_a_picture_an_attempt_could_not_send_is_sent_by_the_next_once(tmp_path):
    """A picture committed while the server is away travels in the checkpoint; the next attempt sends it,
    and sending it again (a third attempt resuming from the same checkpoint) leaves one picture, not two."""
    import torch

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("pictures",
                                                        artifact_location=str(tmp_path / "art"))).info.run_id
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        away = f"http://127.0.0.1:{probe.getsockname()[1]}"
    picture = np.arange(28 * 56, dtype=np.uint8).reshape(28, 56)
    first = RunLogger(run_id, away, hold_until_commit=True)
    first.log_image(picture, key="samples", step=3)
    first.commit()
    assert first.drain(timeout_s=30)
    checkpointed = torch.load(_saved(first.held_records(), tmp_path), weights_only=True)
    first.close(timeout_s=0.1)  # the attempt dies
    for attempt in range(2):
        logger = RunLogger(run_id, uri, hold_until_commit=True)
        logger.resend(checkpointed)
        assert logger.close(timeout_s=30)["sent_all"], attempt
    names = sorted(a.path for a in client.list_artifacts(run_id, "images"))
    assert len(names) == 2 and names[0].startswith("images/samples+step+3+timestamp+"), names  # .png, .webp
    from PIL import Image

    (png,) = [name for name in names if name.endswith(".png")]
    sent = np.asarray(Image.open(client.download_artifacts(run_id, png, str(tmp_path / "back"))))
    np.testing.assert_array_equal(sent, picture)


def _saved(records, folder):
    """``records`` through torch.save, as a checkpoint holds them."""
    import torch

    path = folder / "records.pt"
    torch.save(records, path)
    return path


def test_unreachable_server_never_blocks_and_lost_records_are_listed(tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logger = RunLogger("0" * 32, f"http://127.0.0.1:{port}", tmp_path / "lost.json")
    logger.log_metrics({"loss": 1.5}, 1)
    logger.log_metrics({"loss": 1.25}, 2)
    assert logger.drain(timeout_s=30)  # handled: kept for a retry, not sent
    summary = logger.close(timeout_s=1)
    assert summary["sent_all"] is False and summary["lost_records"] == 2 and summary["errors"]
    lost = json.loads((tmp_path / "lost.json").read_text())
    assert [(r["step"], r["payload"]) for r in lost["records"]] == [(1, {"loss": 1.5}), (2, {"loss": 1.25})]


def test_a_hanging_server_loses_nothing_silently_and_the_sender_stops_at_close(tmp_path, monkeypatch):
    """A server that accepts connections and never answers (each request times out, unlike a refused
    connection): close gives up at its timeout, every record not sent is listed as lost - also those the
    sender thread was still retrying - and the sender stops instead of retrying after close."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as hanging:  # listens, never accepts: requests hang until their timeout
        hanging.bind(("127.0.0.1", 0))
        hanging.listen(64)
        logger = RunLogger("0" * 32, f"http://127.0.0.1:{hanging.getsockname()[1]}", tmp_path / "lost.json")
        for step in range(1, 21):
            logger.log_metrics({"loss": 1.0 / step}, step)
        summary = logger.close(timeout_s=2.5)
        assert summary["sent_all"] is False and summary["lost_records"] == 20, summary
        lost = json.loads((tmp_path / "lost.json").read_text())
        assert [r["step"] for r in lost["records"]] == list(range(1, 21))
        logger._thread.join(timeout=15)
        assert not logger._thread.is_alive(), "the sender thread goes on retrying after close"


@pytest.mark.parametrize("uri", ["file:///tmp/mlruns", "mlruns", "/srv/mlflow/mlruns"])
def test_a_file_store_is_refused_since_it_would_log_a_resent_record_twice(uri, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(StageError, match=r"is a file store.*sqlite:///path/mlflow.db.*http://"):
        tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the environment's URI is checked the same way
    with pytest.raises(StageError, match="is a file store"):
        tracking_uri(None)
    for fine in ("sqlite:////srv/mlflow.db", "http://127.0.0.1:5000", "postgresql://db/mlflow"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", fine)
        assert tracking_uri(None) == fine


def test_lost_records_are_listed_in_the_runs_storage_on_s3_too(s3):
    """A run whose checkpoints are in the bucket lists the records it could not log there, beside them."""
    from pipeline import storage

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        away = f"http://127.0.0.1:{probe.getsockname()[1]}"
    listing = f"{s3.prefix()}/runs/some-run/lost_mlflow_records.json"
    logger = RunLogger("0" * 32, away, listing)
    logger.log_metrics({"loss": 1.5}, 7)
    assert logger.close(timeout_s=1)["lost_records"] == 1
    lost = json.loads(storage.read_bytes(listing))
    assert [(r["step"], r["payload"]) for r in lost["records"]] == [(7, {"loss": 1.5})]


def test_experiments_get_the_model_training_kind_new_or_old(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    key, kind = EXPERIMENT_KIND_TAG
    created = ensure_experiment(client, "new")
    assert client.get_experiment(created).tags[key] == kind
    old = client.create_experiment("old")  # made before the kind existed: it gets it, keeping its id
    assert ensure_experiment(client, "old") == old and client.get_experiment(old).tags[key] == kind
    assert ui_url("http://h:5000/", old, "abc", "model-metrics") == (
        f"http://h:5000/#/experiments/{old}/runs/abc/model-metrics?workflowType=machine_learning"
    )
    assert ui_url("http://h:5000", old, compareRunsMode="CHART") == (
        f"http://h:5000/#/experiments/{old}/runs?workflowType=machine_learning&compareRunsMode=CHART"
    )


def test_compared_params_are_short_and_follow_the_configuration():
    params = load_params(overrides={
        "data.dataset": "fashion_mnist", "model.likelihood": "gaussian_learned_scalar",
        "beta_schedule": {"name": "cyclical", "beta_max": 0.5, "num_cycles": 3, "ratio": 0.5},
        "train.learning_rate": 3e-4,
    })
    chosen = compared_params(params)
    assert chosen["beta_schedule"] == "cyclical" and chosen["schedule.num_cycles"] == 3
    assert chosen["schedule.beta_max"] == 0.5 and chosen["learning_rate"] == 3e-4
    assert chosen["likelihood"] == "gaussian_learned_scalar" and "image_size" not in chosen
    assert compared_params(load_params(overrides={"data.dataset": "celeba"}))["image_size"] == 64
    assert len(chosen) <= 12  # MLflow prints them all above every picture of the run


def _registered(client, name: str, runs: int) -> list[str]:
    experiment = client.create_experiment("registry")
    client.create_registered_model(name)
    run_ids = []
    for _ in range(runs):
        run_id = client.create_run(experiment).info.run_id
        client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id)
        run_ids.append(run_id)
    return run_ids


def test_the_best_test_nll_alias_moves_only_to_a_lower_nll(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    first, better, worse = _registered(client, "vae", 3)

    def figures(bits: float) -> dict:
        return {"test_nll_bits_per_dim": bits, "test_nll": bits * 784 * np.log(2), "num_test_images": 10}

    assert promote_if_best(client, "vae", first, figures(3.6)) == "1"
    assert promote_if_best(client, "vae", better, figures(3.5)) == "2"
    assert promote_if_best(client, "vae", worse, figures(3.7)) == "2"
    holder = client.get_model_version_by_alias("vae", BEST_ALIAS)
    assert str(holder.version) == "2" and float(holder.tags["test_nll_bits_per_dim"]) == 3.5
    assert client.get_model_version("vae", "3").tags["test_nll_bits_per_dim"] == "3.7"  # figures kept on all
    assert promote_if_best(client, "vae", "0" * 32, figures(1.0)) is None  # the run registered nothing
    assert promote_if_best(client, "vae", better, figures(3.55)) == "2"  # re-evaluated holder keeps it
    with pytest.raises(KeyError):
        promote_if_best(client, "vae", first, {"test_nll": 1.0})
