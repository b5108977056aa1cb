"""Evaluate stage: test-split figures (reports/metrics.json) and pictures (reports/eval/*.png) of the trained
model, also logged to its MLflow run (see README, Evaluation).

    python -m pipeline.evaluate [--params params.yaml]
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import artifacts
from pipeline.cli import run_stage, stage_argument_parser
from pipeline.common import StageError, atomic_output, atomic_write_text, resolve, say
from pipeline.config import Params
from pipeline.data import data_hashes, dataset_folder, load_images, load_manifest, load_split
from pipeline.datasets import CLASS_NAMES
from pipeline.scoring import ImageScores, score_images, score_shards
from vae.latent import apply_attribute_vector, attribute_vector, interpolate_images
from vae.model import VAE
from vae.objectives import active_units, bits_per_dim

METRICS_PATH = Path("reports/metrics.json")
IMAGES_DIR = Path("reports/eval")
FID_SAMPLES_AUTO = {"cuda": 10_000, "cpu": 2_000}


def summarize(
    scores: ImageScores, model: VAE, num_samples: int, precision: str, device: str
) -> dict[str, Any]:
    """The headline figures of per-image scores: means over the images, in nats per image unless the key says
    bits; active units (Burda et al. 2016) from the posterior means' variance."""
    count = len(scores.indices)
    negative_elbo = float(scores.reconstruction.mean() + scores.kl.mean())
    nll = float(-scores.log_px.mean())
    num_active, variances = active_units(torch.from_numpy(scores.posterior_mean))
    discrete, dims = model.likelihood.discrete, model.num_dims
    return {
        "num_test_images": count,
        "num_importance_samples": num_samples,
        "test_negative_elbo": negative_elbo,
        "test_reconstruction": float(scores.reconstruction.mean()),
        "test_kl": float(scores.kl.mean()),
        "test_elbo_bits_per_dim": float(bits_per_dim(negative_elbo, dims, discrete)),
        "test_nll": nll,
        "test_nll_bits_per_dim": float(bits_per_dim(nll, dims, discrete)),
        "test_reconstruction_mse": float(scores.squared_error.mean()),
        "active_units": num_active,
        "latent_dim": model.latent_dim,
        "kl_per_dim": scores.kl_per_dim.astype(np.float64).mean(axis=0).tolist(),
        "posterior_mean_variance_per_dim": variances.tolist(),
        "likelihood": model.likelihood.name,
        "likelihood_is_discrete": discrete,
        "precision": precision,
        "evaluation_seconds": scores.seconds,
        "decodes_per_s": scores.decodes / max(scores.seconds, 1e-9),
        "device": device,
    }


def device_name(device: torch.device) -> str:
    return str(device) if device.type == "cpu" else torch.cuda.get_device_name(device)


def test_figures(
    model: VAE,
    images: np.ndarray,
    num_importance_samples: int,
    importance_batch_size: int | str,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Negative ELBO, importance-sampled NLL, KL per dimension, active units and reconstruction MSE of every
    image in ``images`` (uint8 (N, C, H, W)), in one process (see :func:`pipeline.scoring.score_images` for
    the arguments and :func:`summarize` for the figures)."""
    scores = score_images(model, images, np.arange(len(images)), num_importance_samples, seed, device,
                          batch_size, importance_batch_size, precision)
    return summarize(scores, model, num_importance_samples, precision, device_name(device))


@torch.no_grad()
def test_pictures(
    model: VAE,
    test_images: np.ndarray,
    rows: int,
    device: torch.device,
    attributes: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Float pictures (N, C, H, W) in [0, 1] keyed by name: samples, reconstructions, interpolations,
    traversals (the ``rows`` latent dimensions whose posterior means vary most over the test images, -3..3),
    ``manifold`` (a 2-D latent space only) and ``attribute_<Name>`` rows (scales -2..2 of the vector added to
    test faces)."""
    from pipeline.latent_maps import manifold_grid

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
    probe = torch.from_numpy(np.array(test_images[:1000])).to(device)
    variances = model.encode(probe).mean.var(dim=0)
    order = torch.argsort(variances, descending=True)[: min(rows, model.latent_dim)]
    base = model.encode(x[:1]).mean[0]
    values = torch.linspace(-3, 3, rows, device=device)
    codes = base.repeat(len(order), rows, 1)
    for row, dim in enumerate(order.tolist()):
        codes[row, :, dim] = values
    pictures["traversals"] = model.likelihood.mean(model.decode(codes.flatten(0, 1))).cpu().numpy()
    if model.latent_dim == 2:
        pictures["manifold"] = manifold_grid(model, max(rows, 15), device)
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
                f"evaluate.attributes: {name!r} is not an attribute of this dataset; choose from "
                f"{', '.join(split.attribute_names)}"
            )
        labels = np.asarray(split.attributes[:max_images, split.attribute_names.index(name)]).astype(bool)
        if labels.all() or not labels.any():
            continue
        result[name] = (images, labels)
    return result


def _manifest_entry(processed_dir: Path, key: str) -> list[str]:
    """A list the preprocess manifest holds (``attribute_names``, ``class_names``); [] without one."""
    try:
        return list(load_manifest(processed_dir).get(key) or [])
    except (FileNotFoundError, ValueError):
        return []


def scatter_classes(
    params: Params, processed_dir: Path, count: int
) -> tuple[np.ndarray, list[str], str] | None:
    """What colours the latent scatter (``evaluate.latent_scatter``): (class of each of the first ``count``
    test images, class names, title), or None for "none" (and for "auto" on arrays without a manifest).

    Raises:
        StageError: "label" on a dataset without labels, or an attribute name the dataset does not have.
    """
    choice = params.evaluate.latent_scatter
    if choice == "none":
        return None
    try:
        split = load_split(processed_dir, "test")
    except FileNotFoundError as error:
        if choice != "auto":
            raise StageError(f"evaluate.latent_scatter: {choice}, but {error}") from None
        say(f"[evaluate] no latent scatter: {error}")
        return None
    if choice == "auto":
        if split.labels is not None:
            choice = "label"
        elif split.attribute_names:
            choice = "Smiling" if "Smiling" in split.attribute_names else split.attribute_names[0]
        else:
            say(f"[evaluate] no latent scatter: {params.data.dataset} has no class labels or attributes")
            return None
    if choice == "label":
        if split.labels is None:
            raise StageError(
                f"evaluate.latent_scatter: label, but {params.data.dataset} has no class labels; name one of "
                "its attributes (e.g. Smiling) or use none")
        numbered = [str(c) for c in range(int(split.labels.max()) + 1)]
        names = (_manifest_entry(processed_dir, "class_names")
                 or CLASS_NAMES.get(params.data.dataset, numbered))
        return np.asarray(split.labels[:count]).astype(np.int64), names, f"{params.data.dataset} test set"
    if choice not in split.attribute_names:
        known = ", ".join(split.attribute_names) or "none: it has class labels (use label)"
        raise StageError(f"evaluate.latent_scatter: {choice!r} is not an attribute of {params.data.dataset} "
                         f"(its attributes: {known})")
    column = np.asarray(split.attributes[:count, split.attribute_names.index(choice)]).astype(np.int64)
    return column, [f"not {choice}", choice], f"{params.data.dataset} test set by {choice}"


def fid_figures(params: Params, model: VAE, test: np.ndarray, data_hash: str, device: torch.device
                ) -> dict[str, Any]:
    """FID of ``evaluate.fid_num_samples`` prior samples and of as many test reconstructions against all
    ``test`` images (:mod:`pipeline.fid`); with ``evaluate.fid: auto`` and no Inception weights, the reason
    it was skipped instead.

    Raises:
        StageError: ``evaluate.fid: true`` and the weights cannot be had.
    """
    from pipeline import fid

    setting = params.evaluate.fid
    if setting is False:
        return {"fid_skipped": "evaluate.fid is false"}
    try:
        net = fid.load_inception(device)
    except StageError as error:
        if setting == "auto":
            say(f"[evaluate] FID skipped (evaluate.fid: auto): {error}")
            return {"fid_skipped": str(error)}
        raise
    wanted = params.evaluate.fid_num_samples
    count = min(len(test), FID_SAMPLES_AUTO[device.type] if wanted == "auto" else int(wanted))
    reference = fid.reference_statistics(net, test, data_hash)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(params.train.seed)

    def samples(first: int, n: int) -> torch.Tensor:
        return model.sample(n, generator)

    def reconstructions(first: int, n: int) -> torch.Tensor:
        return model(torch.from_numpy(np.array(test[first : first + n])).to(device))

    with torch.no_grad():
        from_prior = fid.generated_statistics(net, samples, count)
        from_test = fid.generated_statistics(net, reconstructions, count)
    return {
        "fid_samples": fid.frechet_distance(from_prior, reference),
        "fid_reconstructions": fid.frechet_distance(from_test, reference),
        "fid_num_samples": count,
        "fid_reference_images": reference.count,
        "fid_feature_extractor": net.name,
    }


def _pictures_and_fid(params: Params, model_config: dict[str, Any], weights: dict[str, torch.Tensor],
                      processed_location: str) -> tuple[dict, dict]:
    """Pictures and FID (run here or as a Ray task, on a GPU when there is one): returns (figures, pictures).
    FID's weights are loaded first, so a missing file fails before any other work. ``processed_location`` is
    the data's path or URI, read through the cache of the node this runs on (a Ray task may run on another
    node than the driver)."""
    from pipeline.distributed import pick_device
    from pipeline.fid import digest

    model = VAE.from_config(model_config)
    model.load_state_dict(weights)
    device = pick_device("auto")
    if device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    processed_dir = dataset_folder(processed_location, params.cluster.s3_endpoint_url)
    test = load_images(processed_dir, "test")
    if params.evaluate.max_images:
        test = test[: params.evaluate.max_images]
    hashes = {k: v for k, v in data_hashes(processed_dir).items() if ".test" in k or "test_" in k}
    figures = fid_figures(params, model, test, digest(hashes), device)
    # CelebA always has attributes; another dataset only when its manifest names some (an image folder with
    # an attributes CSV), so arrays without attributes (or without a manifest) need no training split here.
    named = params.data.dataset == "celeba" or _manifest_entry(processed_dir, "attribute_names")
    attributes = attribute_sets(processed_dir, params.evaluate.attributes) if named else {}
    pictures = test_pictures(model, test, params.evaluate.num_image_rows, device, attributes,
                             seed=params.train.seed)
    return figures, pictures


def evaluate(params: Params) -> dict[str, Any]:
    """Run the evaluation, write reports/metrics.json and reports/eval/*.png, log both to MLflow.

    The per-image NLL runs on ``evaluate.num_workers`` workers (Ray tasks when more than one, or when a
    cluster address is set); pictures and FID run in one process (a Ray task on a cluster: a GPU when it has
    one).

    Raises:
        StageError: no preprocessed test split or trained model, a bad setting (each checked before the work).
    """
    from PIL import Image

    from pipeline.latent_maps import scatter_png
    from pipeline.tracking import image_grid

    evaluation = params.evaluate
    try:
        processed = dataset_folder(params.data.processed_location(), params.cluster.s3_endpoint_url)
    except FileNotFoundError as error:
        raise StageError(str(error)) from None
    if not (processed / "test_images.npy").is_file():
        raise StageError(f"no preprocessed test split in {processed}: run `dvc repro preprocess` first")
    model_dir = artifacts.model_dir_for(params)
    model = artifacts.load_trained_model(model_dir)
    test = load_images(processed, "test")
    if evaluation.max_images:
        test = test[: evaluation.max_images]
    scatter = scatter_classes(params, processed, len(test))
    address = params.cluster.address or os.environ.get("RAY_ADDRESS")
    use_ray = bool(address) or evaluation.num_workers > 1
    args = (params, model.config, model.state_dict(), params.data.processed_location())
    if use_ray:
        import ray

        from pipeline.ray_runtime import connect_ray

        connect_ray(params)
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        extra, pictures = ray.get(ray.remote(num_gpus=gpus, num_cpus=1)(_pictures_and_fid).remote(*args))
    else:
        extra, pictures = _pictures_and_fid(*args)
    settings = {"num_workers": evaluation.num_workers, "num_samples": evaluation.num_importance_samples,
                "seed": params.train.seed, "batch_size": evaluation.batch_size,
                "importance_batch_size": evaluation.importance_batch_size, "precision": evaluation.precision}
    scores = score_shards(model, test, settings, use_ray)
    device = "cuda" if (torch.cuda.is_available() and not use_ray) else "cpu"
    figures = summarize(scores, model, evaluation.num_importance_samples, evaluation.precision,
                        device_name(torch.device(device)) if not use_ray else "ray")
    figures.update(extra, num_workers=evaluation.num_workers)

    images_dir = resolve(IMAGES_DIR)
    images_dir.mkdir(parents=True, exist_ok=True)
    rows = evaluation.num_image_rows
    grids = {}
    for name, images in pictures.items():
        per_row = None if name == "reconstructions" else (int(math.isqrt(len(images))) if name == "manifold"
                                                          else rows)
        grids[name] = image_grid(images, per_row)
        with atomic_output(images_dir / f"{name}.png") as tmp:
            Image.fromarray(grids[name]).save(tmp, format="PNG")
    if scatter is not None and model.latent_dim >= 2:
        png = scatter_png(scores.posterior_mean, *scatter)
        with atomic_output(images_dir / "latent_scatter.png") as tmp:
            tmp.write_bytes(png)
        grids["latent_scatter"] = np.asarray(Image.open(images_dir / "latent_scatter.png").convert("RGB"))
    atomic_write_text(METRICS_PATH, json.dumps(figures, indent=2) + "\n")
    run_name = artifacts.model_run_name(model_dir)
    if run_name:
        saved = artifacts.save_stage_outputs(params, run_name, [METRICS_PATH, IMAGES_DIR])
        say(f"[evaluate] outputs also in {saved}")
    _log_to_mlflow(params, figures, grids, model_dir)
    return figures


def _log_to_mlflow(params: Params, figures: dict[str, Any], grids: dict[str, np.ndarray], model_dir: Path
                   ) -> None:
    """Log the scalar figures and pictures to the training run named in the model's run.json."""
    run_id = artifacts.trained_run_id(model_dir)
    if not run_id:
        return
    from pipeline.run_logger import RunLogger
    from pipeline.tracking import tracking_uri

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
    name = params.mlflow.registered_model_name
    if name and "test_nll_bits_per_dim" in figures:
        import mlflow

        from pipeline.tracking import BEST_ALIAS, promote_if_best

        try:
            client = mlflow.MlflowClient(tracking_uri(params.mlflow.tracking_uri))
            holder = promote_if_best(client, name, run_id, figures)
        except Exception as error:  # noqa: BLE001 - the figures are saved; the registry is a convenience
            print(f"[evaluate] MLflow registry: could not update the {BEST_ALIAS!r} alias ({error})",
                  file=sys.stderr)
        else:
            if holder is not None:
                say(f"[evaluate] registered model {name!r}: alias {BEST_ALIAS!r} is on version {holder}")


def report(params: Params) -> None:
    """Evaluate and print the headline figures and where the pictures are."""
    figures = evaluate(params)
    fid = "FID skipped"
    if "fid_samples" in figures:
        fid = (f"FID {figures['fid_samples']:.1f} (samples), "
               f"{figures['fid_reconstructions']:.1f} (reconstructions)")
    say(f"[evaluate] {figures['num_test_images']} test images on {figures['device']}: -ELBO "
        f"{figures['test_negative_elbo']:.2f} nats, NLL (K={figures['num_importance_samples']}) "
        f"{figures['test_nll']:.2f} nats = {figures['test_nll_bits_per_dim']:.4f} bits/dim, "
        f"{figures['active_units']}/{figures['latent_dim']} active units, {fid}; "
        f"NLL in {figures['evaluation_seconds']:.1f}s; pictures in {resolve(IMAGES_DIR)}")


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.evaluate [--params PATH]``: exit status 0, or 1 with a clear message on stderr."""
    from pipeline.params_file import load_params
    from pipeline.submit import run_or_submit

    args = stage_argument_parser("pipeline.evaluate", __doc__).parse_args(argv)
    return run_stage(
        "evaluate", lambda: run_or_submit("pipeline.evaluate", load_params(args.params), args.params, report)
    )


if __name__ == "__main__":
    sys.exit(main())
