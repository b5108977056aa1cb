"""A sweep's results as rows, one per trial (searched values, epochs run, final and best metrics), and as
reports/tune/trials.csv."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from pipeline.tune.space import flat_values, trial_values

METRICS = ("val_negative_elbo", "val_bits_per_dim")


def trial_rows(results, epochs: int, metric: str) -> list[dict[str, Any]]:
    """One row per trial from Tune's results (in the order the trials were created)."""
    rows = []
    for result in results:
        last = result.metrics or {}
        history = result.metrics_dataframe
        if history is None or "epoch" not in history or history["epoch"].isna().all():
            history = None
        else:  # a resumed trial may have reported an epoch twice: keep its last report
            history = (history.dropna(subset=["epoch"]).drop_duplicates(subset=["epoch"], keep="last")
                       .sort_values("epoch").reset_index(drop=True))
        epochs_run = int(history["epoch"].max()) if history is not None else 0
        status = "error" if result.error else ("stopped_early" if epochs_run < epochs else "completed")
        row: dict[str, Any] = {"trial_id": last.get("trial_id") or Path(result.path).name, "status": status,
                               "stopped_early": status == "stopped_early", "epochs_run": epochs_run,
                               **flat_values(trial_values(result.config))}
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
    return rows


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """The trial with the lowest ``best_<metric>`` (its best epoch), None when no trial reported one."""
    scored = [row for row in rows if math.isfinite(row[f"best_{metric}"])]
    return min(scored, key=lambda row: row[f"best_{metric}"]) if scored else None


def trials_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV: trial, status, searched values, metrics, MLflow run."""
    fixed = [
        "trial_id",
        "status",
        "stopped_early",
        "epochs_run",
        "beta_schedule",
        "latent_dim",
        "learning_rate",
    ]
    schedule_keys = sorted({key for row in rows for key in row if key.startswith("schedule.")})
    metric_keys = [f"{kind}_{name}" for name in METRICS for kind in ("final", "best")]
    fields = fixed + schedule_keys + metric_keys + ["best_epoch", "time_total_s", "mlflow_run_id", "error"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
