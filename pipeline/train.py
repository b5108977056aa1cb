"""Train stage: a Ray Train ``TorchTrainer`` over the per-worker loop, tracked in MLflow.

    python -m pipeline.train [--params params.yaml]            # dvc repro train calls this
    ray job submit --working-dir . -- python -m pipeline.train  # the same on a running cluster

Outputs (DVC): models/vae/, reports/train_metrics.json, reports/train_curves.csv (see README, Training).
"""

from __future__ import annotations

import sys
from typing import Any

from pipeline import artifacts, checkpoints, ray_runtime, storage, tracking
from pipeline.artifacts import run_name
from pipeline.cli import run_stage, stage_argument_parser
from pipeline.common import StageError, resolve
from pipeline.config import Params
from pipeline.data import data_hashes, dataset_folder
from pipeline.params_file import load_params
from pipeline.train_plan import check_batch_fits

__all__ = ["run_name", "train", "main"]


def train(params: Params, train_fn=None) -> dict[str, Any]:
    """Run the whole training on Ray and write the stage outputs. Returns the final metrics.

    ``train_fn`` replaces the workers' function (:func:`pipeline.ray_runtime.ray_train_function`); tests wrap
    it to inject faults.

    Raises:
        StageError: the data are missing, the cluster cannot be reached or lacks resources, the loss diverged
            (not retried), or training failed (after ``train.max_failures`` restarts); the message says which.
    """
    import numpy as np
    from ray.train import TrainingFailedError

    endpoint = params.cluster.s3_endpoint_url
    try:
        processed = dataset_folder(params.data.processed_location(), endpoint)
    except FileNotFoundError as error:
        raise StageError(str(error)) from None
    if not (processed / "train_images.npy").is_file():
        raise StageError(f"no preprocessed data in {processed}: run `dvc repro preprocess` first")
    train = params.train
    check_batch_fits(train, processed, [train.num_workers, train.min_workers or train.num_workers])
    hashes = data_hashes(processed)
    name = run_name(params, hashes)
    location = artifacts.storage_location(params)
    ray_runtime.check_storage(location, endpoint)
    where = storage.join(location, name)
    earlier = ray_runtime.earlier_divergence(location, name, endpoint)
    if earlier:
        raise StageError(
            f"run {name} diverged before ({earlier}) and is not resumed: the same settings diverge again. "
            f"{ray_runtime.DIVERGENCE_ADVICE}; or delete {where} to train these settings from scratch in a "
            "new MLflow run."
        )
    tracking.tracking_uri(params.mlflow.tracking_uri)  # a store that breaks exactly-once: refused before Ray
    ray_runtime.connect_ray(params)
    use_gpu = ray_runtime.resolve_use_gpu(params)
    ray_runtime.check_cpu_capacity(params, use_gpu)
    run_id, uri = tracking.open_training_run(params, name, where, hashes)
    config = ray_runtime.worker_config(
        params, run_id, uri, where
    )
    print(
        f"[train] run {name}: {params.train.num_workers} worker(s), {'GPU' if use_gpu else 'CPU'}, "
        f"checkpoints in {where}, MLflow run {run_id} at {uri}",
        flush=True,
    )
    try:
        result = ray_runtime.make_trainer(params, config, name, use_gpu, train_fn=train_fn).fit()
    except TrainingFailedError as error:
        tracking.end_run(uri, run_id, "FAILED")
        raise StageError(
            f"training failed (after up to {params.train.max_failures} restarts from the last "
            f"checkpoint): {error}\nRe-running the stage resumes from the latest checkpoint in "
            f"{where}."
        ) from None
    diverged = ray_runtime.non_finite_error(result.filesystem, result.path)
    if diverged:
        tracking.end_run(uri, run_id, "FAILED")
        raise StageError(
            f"training diverged (not retried: the same settings diverge again): {diverged}. "
            f"{ray_runtime.DIVERGENCE_ADVICE}."
        )
    state = checkpoints.final_state(result)
    if state is None:
        raise StageError(f"training finished without a checkpoint in {where}")
    metrics = artifacts.write_training_outputs(state, name, run_id)
    saved = artifacts.save_stage_outputs(
        params, name, [artifacts.MODEL_DIR, artifacts.TRAIN_METRICS_PATH, artifacts.TRAIN_CURVES_PATH]
    )
    print(f"[train] outputs also in {saved} (the evaluate stage reads them there when it runs elsewhere)",
          flush=True)
    example = np.load(processed / "valid_images.npy", mmap_mode="r")[:2].copy()
    try:
        tracking.log_final_model(params, run_id, uri, artifacts.load_trained_model(), example)
        tracking.log_artifact(uri, run_id, resolve(artifacts.TRAIN_METRICS_PATH))
        tracking.end_run(uri, run_id, "FINISHED")
    except Exception as error:  # noqa: BLE001 - training is done; tracking trouble must not lose the outputs
        print(
            "[train] MLflow: could not log the final model "
            f"({type(error).__name__}: {error}); the model is in "
            f"{resolve(artifacts.MODEL_DIR)}",
            file=sys.stderr,
        )
    return metrics


def report(params: Params) -> None:
    """Train and print the final figures."""
    metrics = train(params)
    print(
        f"[train] done: val -ELBO {metrics.get('val_negative_elbo', float('nan')):.3f} nats/image, "
        f"{metrics.get('val_bits_per_dim', float('nan')):.4f} "
        f"bits/dim; model in {resolve(artifacts.MODEL_DIR)}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.train [--params PATH]``: exit status 0, or 1 with a clear message on stderr."""
    from pipeline.submit import run_or_submit

    args = stage_argument_parser("pipeline.train", __doc__).parse_args(argv)
    return run_stage(
        "train",
        lambda: run_or_submit(
            "pipeline.train", artifacts.with_best_params(load_params(args.params)), args.params, report
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
