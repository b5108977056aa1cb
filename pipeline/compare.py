"""The model table (``make compare``): architectures x likelihoods trained on Fashion-MNIST at one budget,
each as a DVC experiment on top of the quick start's settings (no sweep), scored by the evaluate stage, and
written to reports/model_table.md and reports/model_table.json.

    python -m pipeline.compare [--architectures mlp conv] [--likelihoods bernoulli ...] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pipeline.common import REPO_ROOT, atomic_write_text, say
from pipeline.config import ModelConfig
from pipeline.quickstart import SETTINGS as QUICKSTART_SETTINGS
from pipeline.quickstart import dvc_command, parse_settings, run_experiment, settings_option

# Encoder widths per architecture for 28x28 images (the decoders mirror them): the quick start's MLP, and
# three stride-2 conv blocks (28 -> 16 -> 8 -> 4 after padding to 32) for the conv and residual nets.
ARCHITECTURES: dict[str, str] = {"mlp": "[512,256]", "conv": "[32,64,128]", "resnet": "[32,64,128]"}
LIKELIHOODS = ("bernoulli", "gaussian_learned_scalar", "discretized_logistic", "categorical_256")
# One budget for every model: one epoch of the 55,000 training images at batch 128 (429 steps), KL warm-up
# over the first 300 steps, and the importance-sampled NLL with K = 100 on the first 1,000 test images. Sized
# so the 12 models fit about an hour on a 2-core CPU (the MLP with the 256-way categorical output is the
# slowest: its last layer has 51M weights); raise it with --set train.epochs=10 etc. on a GPU.
BUDGET: dict[str, str] = {
    "train.epochs": "1",
    "beta_schedule.warmup_steps": "300",
    "train.lr_warmup_steps": "50",
    "evaluate.num_importance_samples": "100",
    "evaluate.max_images": "1000",
}
EXPERIMENT_NAME = "vae-fashion-mnist-models"
TABLE_MD = Path("reports/model_table.md")
TABLE_JSON = Path("reports/model_table.json")


def experiment_settings(architecture: str, likelihood: str, extra: dict[str, str]) -> dict[str, str | None]:
    """The ``dvc exp run -S`` settings of one model of the table: the quick start's data and training settings
    without its sweep, the model, the budget, then ``extra`` (``--set``) on top. No registered model version
    is made for table runs."""
    settings: dict[str, str | None] = {
        key: value for key, value in QUICKSTART_SETTINGS.items() if not key.startswith("tune.")
    }
    settings.update({
        "train.use_best_params": "false",
        "model.architecture": architecture,
        "model.hidden_dims": ARCHITECTURES[architecture],
        "model.likelihood": likelihood,
        "train.run_name": f"vae-{architecture}-{likelihood}",
        "mlflow.experiment_name": EXPERIMENT_NAME,
        "mlflow.registered_model_name": "null",
        **BUDGET,
        **extra,
    })
    return settings


def table_row(architecture: str, likelihood: str, wall_s: float, status: int, root: Path) -> dict:
    """One row: the model, the evaluate stage's figures (reports/metrics.json) and seconds, training's
    images/s and seconds (the sum of reports/train_curves.csv's epoch_seconds: the epochs' own timings, kept
    when a finished run is found again in its checkpoints and not retrained), or the exit status when the
    experiment failed. ``wall_s`` is the whole experiment's time (every stage, Ray's start included)."""
    row: dict = {"architecture": architecture, "likelihood": likelihood, "wall_s": wall_s, "status": status}
    if status == 0:
        metrics = json.loads((root / "reports/metrics.json").read_text())
        train = json.loads((root / "reports/train_metrics.json").read_text())
        for key in ("test_nll", "test_nll_bits_per_dim", "test_negative_elbo", "test_elbo_bits_per_dim",
                    "active_units", "latent_dim", "num_importance_samples", "num_test_images",
                    "evaluation_seconds", "fid_samples", "fid_reconstructions", "fid_skipped"):
            if key in metrics:
                row[key] = metrics[key]
        with (root / "reports/train_curves.csv").open(newline="") as curves:
            row["train_seconds"] = sum(float(epoch["epoch_seconds"]) for epoch in csv.DictReader(curves))
        row["train_images_per_s"] = train.get("images_per_s")
        row["epochs"] = train.get("epochs")
        row["mlflow_run_id"] = train.get("mlflow_run_id")
    return row


def _figure(value, digits: int) -> str:
    missing = value is None or (isinstance(value, float) and math.isnan(value))
    return "-" if missing else f"{value:,.{digits}f}"


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def markdown_table(rows: Sequence[dict]) -> str:
    """The table as Markdown, one line per model, failed experiments included with their exit status."""
    lines = [
        "| architecture | likelihood | test NLL (bits/dim) | test NLL (nats) | test -ELBO (nats) "
        "| FID (samples) | active units | train img/s | train time | eval time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row["status"]:
            lines.append(f"| {row['architecture']} | {row['likelihood']} | failed (exit {row['status']}) "
                         "| | | | | | | |")
            continue
        likelihood = row["likelihood"] + (" (binarized data)" if row["likelihood"] == "bernoulli" else "")
        fid = _figure(row.get("fid_samples"), 1) if "fid_samples" in row else "skipped"
        lines.append(
            f"| {row['architecture']} | {likelihood} | {_figure(row.get('test_nll_bits_per_dim'), 3)} "
            f"| {_figure(row.get('test_nll'), 1)} | {_figure(row.get('test_negative_elbo'), 1)} | {fid} "
            f"| {row.get('active_units', '-')}/{row.get('latent_dim', '-')} "
            f"| {_figure(row.get('train_images_per_s'), 0)} | {_minutes(row.get('train_seconds'))} "
            f"| {_minutes(row.get('evaluation_seconds'))} |"
        )
    return "\n".join(lines)


def _table_order(row: dict) -> tuple:
    likelihoods = {name: index for index, name in enumerate(LIKELIHOODS)}
    return (list(ARCHITECTURES).index(row["architecture"]),
            likelihoods.get(row["likelihood"], len(likelihoods)), row["likelihood"])


def run_table(
    root: Path,
    architectures: Sequence[str],
    likelihoods: Sequence[str],
    extra: dict[str, str],
    runner: Callable[[Path, list[str]], int] = run_experiment,
) -> list[dict]:
    """Train and evaluate every (architecture, likelihood) pair, one DVC experiment each (every stage run
    again, nothing restored from DVC's run cache: the evaluation is always this code's), in order; a failed
    experiment becomes a row with its exit status and the others still run. The tables are rewritten after
    every experiment, so an interrupted comparison keeps what it measured; rows of other models already in
    reports/model_table.json at the same budget are kept (a re-run of one model replaces its row only).
    Returns every row of the table."""
    budget = {**BUDGET, **extra}
    rows: list[dict] = []
    if (root / TABLE_JSON).is_file():
        previous = json.loads((root / TABLE_JSON).read_text())
        if previous.get("budget") == budget:
            rows = previous["rows"]
    models = list(itertools.product(architectures, likelihoods))
    for index, (architecture, likelihood) in enumerate(models, 1):
        say(f"[compare] {architecture} x {likelihood} ({index} of {len(models)})")
        started = time.perf_counter()
        status = runner(root, dvc_command(experiment_settings(architecture, likelihood, extra), force=True))
        row = table_row(architecture, likelihood, time.perf_counter() - started, status, root)
        rows = [r for r in rows if (r["architecture"], r["likelihood"]) != (architecture, likelihood)]
        rows.append(row)
        rows.sort(key=_table_order)
        atomic_write_text(root / TABLE_JSON, json.dumps({"budget": budget, "rows": rows}, indent=2) + "\n")
        atomic_write_text(root / TABLE_MD, markdown_table(rows) + "\n")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--architectures", nargs="+", choices=list(ARCHITECTURES),
                        default=list(ARCHITECTURES))
    parser.add_argument("--likelihoods", nargs="+", default=list(LIKELIHOODS),
                        choices=ModelConfig.model_fields["likelihood"].annotation.__args__)
    settings_option(parser, "train.epochs=10 (the budget or any setting)")
    parser.add_argument("--dry-run", action="store_true", help="print the dvc commands and stop")
    args = parser.parse_args(argv)
    extra = parse_settings(parser, args.set)
    if args.dry_run:
        for architecture, likelihood in itertools.product(args.architectures, args.likelihoods):
            print(" ".join(dvc_command(experiment_settings(architecture, likelihood, extra), force=True)))
        return 0
    root = Path(os.environ.get("VAE_PROJECT_ROOT") or REPO_ROOT)
    rows = run_table(root, args.architectures, args.likelihoods, extra)
    say("\n" + markdown_table(rows) + f"\n\n[compare] written to {root / TABLE_MD} and {root / TABLE_JSON}; "
        f"the runs are in the MLflow experiment {EXPERIMENT_NAME!r} and in `dvc exp show`")
    return 1 if any(row["status"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
