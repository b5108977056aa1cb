"""Evaluate stage: test-split figures (reports/metrics.json) and pictures (reports/eval/*.png) of the trained
model, also logged to its MLflow run (see README, Evaluation).

    python -m pipeline.evaluate [--params params.yaml]
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import artifacts
from pipeline.cli import run_stage, stage_argument_parser
from pipeline.common import (
    StageError,
    atomic_output,
    atomic_write_text,
    resolve,
)
from pipeline.config import Params
from pipeline.data import BatchSource, evaluation_indices, load_images, load_split
from pipeline.figures import autocast_for
from vae.latent import apply_attribute_vector, attribute_vector, interpolate_images
from vae.model import VAE
from vae.objectives import active_units, bits_per_dim, importance_sampled_log_likelihood

METRICS_PATH = Path("reports/metrics.json")
IMAGES_DIR = Path("reports/eval")


@torch.no_grad()
def test_figures(
    model: VAE,
    images: np.ndarray,
    num_importance_samples: int,
    importance_batch_size: int,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Negative ELBO, importance-sampled NLL, KL per dimension, active units and reconstruction MSE.

    Args:
        model: the trained VAE (moved to ``device``, eval mode).
        images: uint8 (N, C, H, W) test images.
        num_importance_samples: K.
        importance_batch_size: samples of z decoded at once per image.
        precision: "fp32" or "bf16" (autocast of the networks), the same for the ELBO and the NLL; the
            likelihood terms are computed in fp32 either way.
    Returns:
        dict of figures; per-image figures are means over the N images, in nats unless the key says bits.
    """
    model = model.to(device).eval()
    source = BatchSource(images, device, on_device=device.type == "cuda")
    indices = evaluation_indices(images.shape[0])
    generator = torch.Generator(device=device).manual_seed(seed)
    autocast = autocast_for(precision, device)
    sums = {"reconstruction": 0.0, "kl": 0.0, "nll": 0.0, "squared_error": 0.0}
    kl_per_dim = torch.zeros(model.latent_dim, dtype=torch.float64, device=device)
    posterior_means = []
    count = 0
    start = time.perf_counter()
    for x in source.all_batches(indices, batch_size):
        target = model.likelihood.prepare_target(x, generator)
        with autocast():
            terms = model.elbo_terms(x, 1, generator=generator, target=target)
            log_px = importance_sampled_log_likelihood(
                model, x, num_importance_samples, importance_batch_size, target, generator
            )
            reconstruction = model(x)
        sums["reconstruction"] += float(terms.reconstruction.double().sum())
        sums["kl"] += float(terms.kl.double().sum())
        kl_per_dim += terms.kl_per_dim.double().sum(dim=0)
        posterior_means.append(terms.posterior.mean.float().cpu())
        sums["nll"] += float(-log_px.double().sum())
        sums["squared_error"] += float(
            (reconstruction - x.float() / 255.0).pow(2).double().mean(dim=(1, 2, 3)).sum()
        )
        count += x.shape[0]
    seconds = time.perf_counter() - start
    means = {key: value / count for key, value in sums.items()}
    num_active, variances = active_units(torch.cat(posterior_means))
    discrete, dims = model.likelihood.discrete, model.num_dims
    negative_elbo = means["reconstruction"] + means["kl"]
    return {
        "num_test_images": count,
        "num_importance_samples": num_importance_samples,
        "test_negative_elbo": negative_elbo,
        "test_reconstruction": means["reconstruction"],
        "test_kl": means["kl"],
        "test_elbo_bits_per_dim": float(bits_per_dim(negative_elbo, dims, discrete)),
        "test_nll": means["nll"],
        "test_nll_bits_per_dim": float(bits_per_dim(means["nll"], dims, discrete)),
        "test_reconstruction_mse": means["squared_error"],
        "active_units": num_active,
        "latent_dim": model.latent_dim,
        "kl_per_dim": (kl_per_dim / count).tolist(),
        "posterior_mean_variance_per_dim": variances.tolist(),
        "likelihood": model.likelihood.name,
        "likelihood_is_discrete": discrete,
        "precision": precision,
        "evaluation_seconds": seconds,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
    }


@torch.no_grad()
def test_pictures(
    model: VAE,
    test_images: np.ndarray,
    variances: list[float],
    rows: int,
    device: torch.device,
    attributes: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    train_images: np.ndarray | None = None,
    test_attributes: np.ndarray | None = None,
    attribute_names: list[str] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Float pictures (N, C, H, W) in [0, 1] keyed by name: samples, reconstructions, interpolations,
    traversals, and ``attribute_<Name>`` rows (scales -2..2 of the vector added to test faces)."""
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    pictures: dict[str, np.ndarray] = {}
    pictures["samples"] = model.sample(rows * rows, generator).cpu().numpy()
    x = torch.from_numpy(np.array(test_images[: rows * 2])).to(device)
    pairs = torch.stack([x.float() / 255.0, model(x)], dim=1).flatten(0, 1)
    pictures["reconstructions"] = pairs.cpu().numpy()
    lines = [
        interpolate_images(model, x[2 * i], x[2 * i + 1], rows) for i in range(min(rows, x.shape[0] // 2))
    ]
    pictures["interpolations"] = torch.cat(lines).cpu().numpy()
    order = np.argsort(variances)[::-1][: min(rows, model.latent_dim)]
    base = model.encode(x[:1]).mean[0]
    values = torch.linspace(-3, 3, rows, device=device)
    codes = base.repeat(len(order), rows, 1)
    for row, dim in enumerate(order.tolist()):
        codes[row, :, dim] = values
    pictures["traversals"] = model.likelihood.mean(model.decode(codes.flatten(0, 1))).cpu().numpy()
    if attributes:
        scales = torch.linspace(-2, 2, rows, device=device)
        faces = x[:rows]
        for name, (images, has) in attributes.items():
            vector = attribute_vector(model, torch.from_numpy(np.array(images)), torch.from_numpy(has))
            edited = apply_attribute_vector(model, faces, vector, scales)
            pictures[f"attribute_{name}"] = edited.flatten(0, 1).cpu().numpy()
    return pictures


def attribute_sets(
    processed_dir: Path, names: list[str], max_images: int = 20_000
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each attribute name: (training images, 0/1 labels), the first ``max_images`` training images.

    Raises:
        StageError: a name that is not one of the dataset's attributes (lists the valid ones).
    """
    split = load_split(processed_dir, "train")
    if split.attributes is None or not split.attribute_names:
        return {}
    images = np.array(split.images[:max_images])
    result = {}
    for name in names:
        if name not in split.attribute_names:
            raise StageError(
                f"evaluate.attributes: {name!r} is not a CelebA attribute; choose from "
                f"{', '.join(split.attribute_names)}"
            )
        labels = np.asarray(split.attributes[:max_images, split.attribute_names.index(name)]).astype(bool)
        if labels.all() or not labels.any():
            continue
        result[name] = (images, labels)
    return result


def _evaluate(
    params: Params, model_config: dict[str, Any], weights: dict[str, torch.Tensor], processed_dir: str
) -> tuple[dict, dict]:
    """The computation (runs here or as a Ray task): returns (figures, pictures)."""
    model = VAE.from_config(model_config)
    model.load_state_dict(weights)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    evaluation = params.evaluate
    test = load_images(processed_dir, "test")
    if evaluation.max_images:
        test = test[: evaluation.max_images]
    figures = test_figures(
        model,
        test,
        evaluation.num_importance_samples,
        evaluation.importance_batch_size,
        evaluation.batch_size,
        device,
        seed=params.train.seed,
        precision=evaluation.precision,
    )
    attributes = (
        attribute_sets(Path(processed_dir), evaluation.attributes) if params.data.dataset == "celeba" else {}
    )
    pictures = test_pictures(
        model,
        test,
        figures["posterior_mean_variance_per_dim"],
        evaluation.num_image_rows,
        device,
        attributes,
        seed=params.train.seed,
    )
    return figures, pictures


def evaluate(params: Params) -> dict[str, Any]:
    """Run the evaluation, write reports/metrics.json and reports/eval/*.png, log both to MLflow."""
    from PIL import Image

    from pipeline.tracking import image_grid

    processed = params.data.processed_path()
    if not (processed / "test_images.npy").is_file():
        raise StageError(f"no preprocessed test split in {processed}: run `dvc repro preprocess` first")
    model = artifacts.load_trained_model()
    args = (params, model.config, model.state_dict(), str(processed))
    address = params.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        import ray

        from pipeline.ray_runtime import connect_ray

        connect_ray(params)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        figures, pictures = ray.get(ray.remote(num_gpus=gpus, num_cpus=1)(_evaluate).remote(*args))
    else:
        figures, pictures = _evaluate(*args)

    images_dir = resolve(IMAGES_DIR)
    images_dir.mkdir(parents=True, exist_ok=True)
    rows = params.evaluate.num_image_rows
    grids = {}
    for name, images in pictures.items():
        grids[name] = image_grid(images, rows if name != "reconstructions" else None)
        with atomic_output(images_dir / f"{name}.png") as tmp:
            Image.fromarray(grids[name]).save(tmp, format="PNG")
    atomic_write_text(METRICS_PATH, json.dumps(figures, indent=2) + "\n")
    _log_to_mlflow(params, figures, grids)
    return figures


def _log_to_mlflow(params: Params, figures: dict[str, Any], grids: dict[str, np.ndarray]) -> None:
    """Log the scalar figures and pictures to the training run named in models/vae/run.json."""
    run_id = artifacts.trained_run_id()
    if not run_id:
        return
    from pipeline.tracking import RunLogger, tracking_uri

    logger = RunLogger(run_id, tracking_uri(params.mlflow.tracking_uri))
    scalars = {
        k: float(v)
        for k, v in figures.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }
    logger.log_metrics(scalars, 0)
    for name, grid in grids.items():
        logger.log_image(grid, key=f"eval_{name}", step=0)
    summary = logger.close(timeout_s=30)
    if not summary["sent_all"]:
        print(
            f"[evaluate] MLflow: {summary['lost_records']} records not logged ({summary['errors'][:1]})",
            file=sys.stderr,
        )


def report(params: Params) -> None:
    """Evaluate and print the headline figures."""
    figures = evaluate(params)
    print(f"[evaluate] {figures['num_test_images']} test images on {figures['device']}: -ELBO "
          f"{figures['test_negative_elbo']:.2f} nats, NLL (K={figures['num_importance_samples']}) "
          f"{figures['test_nll']:.2f} nats = {figures['test_nll_bits_per_dim']:.4f} bits/dim, "
          f"{figures['active_units']}/{figures['latent_dim']} active units, "
          f"{figures['evaluation_seconds']:.1f}s")


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.evaluate [--params PATH]``: exit status 0, or 1 with a clear message on stderr."""
    from pipeline.config import load_params
    from pipeline.submit import run_or_submit

    args = stage_argument_parser("pipeline.evaluate", __doc__).parse_args(argv)
    return run_stage(
        "evaluate", lambda: run_or_submit("pipeline.evaluate", load_params(args.params), args.params, report)
    )


if __name__ == "__main__":
    sys.exit(main())
