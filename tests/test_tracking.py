"""pipeline.tracking.RunLogger: the workers' non-blocking MLflow logger, against a real SQLite store and
against a server address where nothing listens."""

from __future__ import annotations

import json
import socket

import mlflow
import numpy as np

from pipeline.tracking import RunLogger, image_grid


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
