"""Training and evaluation throughput, each side by side with what it is compared to, in one run.

    .venv/bin/python benchmarks/train_throughput.py                     # CPU-sized: ~6 min on 2 cores
    python benchmarks/train_throughput.py --device cuda --full          # GPU scale (CelebA-sized epochs,
    K=1000)

1. Loop overhead (Fashion-MNIST MLP 784-512-256-32, discretized logistic, batch 128): the project's
   ``pipeline.train_loop.train_worker`` against a plain PyTorch loop of the same model, likelihood, batch and
   AdamW step, alternated ``--repeats`` times; medians and their ratio.
2. CelebA-64 (the reference conv VAE 32-512, latent 128): the common public pipeline (torchvision ``CelebA`` +
   ``CenterCrop(148)`` + ``Resize(64)`` + ``ToTensor`` through a ``DataLoader`` with 4 workers, batch 64,
   fp32, eager, Adam) against ``train_worker`` on uint8 arrays of CelebA's shape (the real arrays when
   preprocessed, else synthetic pixels, as the run says), at batch 256 and ``--extra-batch-sizes``.
   torch.compile against eager for the MLP, conv and resnet VAEs (``--parts compile``): steady images/s,
   the cold compile time and the images after which it has paid for itself (``pipeline.train_plan``'s
   rule for ``train.compile: auto`` rests on these).
3. The device's own limits (a matmul in the training dtype, a device copy), the model's FLOPs per image
   (``torch.utils.flop_counter``) and the FLOP/s achieved; the K-sample importance-sampled NLL timed through
   the evaluate stage's own ``pipeline.evaluate.test_figures``; several training processes sharing the device
   (as Ray Tune's fractional-GPU trials do) against one alone.

A table goes to stdout; the figures, with command, device, date and commit, go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.recording import RESULTS_PATH, append_to_section, commit, cores, cpu_model  # noqa: E402
from pipeline.config import Params  # noqa: E402
from pipeline.datasets import CELEBA_SPLIT_COUNTS  # noqa: E402
from pipeline.evaluate import test_figures  # noqa: E402
from pipeline.params_file import load_params  # noqa: E402
from pipeline.sessions import LocalSession, WorkerConfig  # noqa: E402
from pipeline.train_loop import train_worker  # noqa: E402
from pipeline.train_plan import make_optimizer  # noqa: E402
from vae.model import VAE, ELBOObjective  # noqa: E402

SECTION = "## Training"
SECTION_INTRO = (
    "Written by `benchmarks/train_throughput.py` (one block per run, newest last): loop overhead "
    "against a plain PyTorch loop; the common CelebA pipeline against the project's; device limits, "
    "evaluation, trials sharing the device."
)
CELEBA_SHAPE = (3, 64, 64)
MNIST_SHAPE = (1, 28, 28)
CPU_SIZES = {
    "train_images": 4096,
    "valid_images": 256,
    "epochs": 2,
    "extra_batch_sizes": "64",
    "baseline_jpegs": 1024,
    "baseline_steps": 24,
    "mlp_images": 55_000,
    "repeats": 3,
    "eval_images": 8,
    "trials": 2,
    "trial_images": 1024,
    "compile_images": 4096,
}
FULL_SIZES = {
    "train_images": CELEBA_SPLIT_COUNTS["train"],
    "valid_images": CELEBA_SPLIT_COUNTS["valid"],
    "epochs": 3,
    "extra_batch_sizes": "1024",
    "baseline_jpegs": 2048,
    "baseline_steps": 200,
    "mlp_images": 55_000,
    "repeats": 3,
    "eval_images": CELEBA_SPLIT_COUNTS["test"],
    "trials": 4,
    "trial_images": 32768,
    "compile_images": 32768,
}


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def si(value: float, unit: str) -> str:
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_model()}, {cores()} cores"


def other_load() -> float:
    """The 1-minute load average over the cores (other jobs on a shared machine lower every figure)."""
    return os.getloadavg()[0] / (os.cpu_count() or 1)


def time_repeated(function, device: torch.device, min_seconds: float) -> float:
    """Seconds per call of ``function`` (after a warm-up call), over at least ``min_seconds`` and 3 calls."""
    function()
    sync(device)
    reps, start = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - start < min_seconds:
        function()
        reps += 1
        if reps >= 3:
            sync(device)
    return (time.perf_counter() - start) / reps


def write_arrays(
    folder: Path, shape: tuple[int, int, int], counts: dict[str, int], source: Path | None
) -> str:
    """``{split}_images.npy`` in ``folder``: the first N images of the real arrays in ``source``, else
    synthetic uint8 pixels (training throughput does not depend on their values). Returns which."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    real = source is not None and all((source / f"{split}_images.npy").is_file() for split in counts)
    for split, count in counts.items():
        if real:
            array = np.load(source / f"{split}_images.npy", mmap_mode="r")
            if array.shape[1:] != shape or len(array) < count:
                real = False
        images = (
            np.ascontiguousarray(np.load(source / f"{split}_images.npy", mmap_mode="r")[:count])
            if real
            else rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
        )
        np.save(folder / f"{split}_images.npy", images)
    return f"real arrays from {source}" if real else f"synthetic uint8 pixels of shape {shape}"


def reference_params(base: Params, **train: Any) -> Params:
    """The benchmark's params: params.yaml's, with this run's train settings."""
    return base.model_copy(update={"train": base.train.model_copy(update=train)})


def run_worker(params: Params, processed: Path) -> dict[str, Any]:
    """``train_worker`` on a LocalSession (its progress lines silenced): the loop's own per-epoch figures."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-ckpt-") as directory,
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
    ):
        start = time.perf_counter()
        result = train_worker(WorkerConfig(params, str(processed)), LocalSession(directory, 1))
        wall = time.perf_counter() - start
    history = result["history"]
    steady = history[1:] or history  # the first epoch warms up (allocator, kernels, page cache)
    images = sum(h["epoch_seconds"] * h["images_per_s"] for h in history)
    return {
        "train_images_per_s": median(h["images_per_s"] for h in steady),
        "wall_images_per_s": images / wall,
        "epoch_seconds": median(h["epoch_seconds"] for h in steady),
        "epochs": len(history),
        "first_epoch_seconds": history[0]["epoch_seconds"],
    }


# ----------------------------------------------------------------------------------------------------------
# 1. Loop overhead: train_worker against a plain loop
# ----------------------------------------------------------------------------------------------------------
def plain_loop(params: Params, images: np.ndarray, device: torch.device, fused: bool) -> float:
    """A plain PyTorch loop of the same model, likelihood, batch and step (beta warm-up as the schedule): one
    epoch over ``images``; returns images/s. ``fused``: the project's optimizer (make_optimizer) instead of
    ``torch.optim.AdamW`` as written by hand."""
    torch.manual_seed(0)
    m, train = params.model, params.train
    model = VAE(m.architecture, MNIST_SHAPE, m.latent_dim, m.hidden_dims, m.likelihood).to(device)
    optimizer = (
        make_optimizer(model, train, device)
        if fused
        else torch.optim.AdamW(model.parameters(), lr=train.learning_rate)
    )
    data = torch.from_numpy(images).to(device)
    batch = train.batch_size
    order = torch.randperm(len(data), device=device)
    start = time.perf_counter()
    steps = len(data) // batch
    for step in range(steps):
        x = data[order[step * batch : (step + 1) * batch]]
        terms = model.elbo_terms(x)
        loss = terms.reconstruction.mean() + params.beta_schedule.beta_at(step) * terms.kl.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def loop_overhead(base: Params, args, device: torch.device, workdir: Path) -> list[tuple[str, str, str]]:
    processed = workdir / "mlp"
    source = REPO_ROOT / "data" / "processed" / "fashion_mnist"
    data = write_arrays(processed, MNIST_SHAPE, {"train": args.mlp_images, "valid": 1000}, source)
    params = base.model_copy(
        update={
            "model": base.model.model_copy(
                update={
                    "architecture": "mlp",
                    "hidden_dims": [512, 256],
                    "latent_dim": 32,
                    "likelihood": "discretized_logistic",
                }
            ),
            "train": base.train.model_copy(
                update={
                    "batch_size": 128,
                    "epochs": 1,
                    "cpus_per_worker": args.threads,
                    "use_gpu": device.type == "cuda",
                    "log_every_n_steps": 10**9,
                }
            ),
            "beta_schedule": type(base.beta_schedule)(warmup_steps=2000)
            if base.beta_schedule.name == "linear"
            else base.beta_schedule,
        }
    )
    images = np.load(processed / "train_images.npy")
    figures: dict[str, list[float]] = {"plain": [], "plain_fused": [], "project": []}
    for _ in range(args.repeats):  # alternated, so a change of the machine's load hits every side alike
        figures["plain"].append(plain_loop(params, images, device, fused=False))
        figures["plain_fused"].append(plain_loop(params, images, device, fused=True))
        figures["project"].append(run_worker(params, processed)["train_images_per_s"])
    med = {key: median(values) for key, values in figures.items()}
    spread = {key: f"{min(v):,.0f}-{max(v):,.0f}" for key, v in figures.items()}
    note = (f"{args.mlp_images} images ({data}), batch 128, 1 epoch per run, median of {args.repeats} "
            "alternated runs")
    return [
        ("**1. Loop overhead (MLP 784-512-256-32, discretized logistic)**", "", note),
        ("plain loop, torch.optim.AdamW", f"{med['plain']:,.0f} img/s", f"range {spread['plain']}"),
        (
            "plain loop, the project's fused AdamW",
            f"{med['plain_fused']:,.0f} img/s",
            f"range {spread['plain_fused']}",
        ),
        (
            "train_worker (train steps)",
            f"{med['project']:,.0f} img/s",
            f"range {spread['project']}; data gather, "
            "LR schedule, clipping check, NaN check and step logging included; validation excluded",
        ),
        (
            "ratio train_worker / plain",
            f"{med['project'] / med['plain']:.2f}x",
            "as the plain loop is usually written",
        ),
        (
            "ratio train_worker / plain with fused AdamW",
            f"{med['project'] / med['plain_fused']:.2f}x",
            "the loop's own overhead, the optimizer alike",
        ),
    ]


# ----------------------------------------------------------------------------------------------------------
# 2. CelebA-64: the common public pipeline against train_worker
# ----------------------------------------------------------------------------------------------------------
def prepare_jpegs(workdir: Path, count: int) -> tuple[Path, bool, str]:
    """(torchvision root, synthetic, description) of the baseline's JPEG folder."""
    real = REPO_ROOT / "data" / "raw" / "celeba"
    if (real / "celeba" / "img_align_celeba").is_dir():
        return real, False, f"real CelebA JPEGs in {real}"
    from benchmarks.celeba_layout import write_celeba_fixture

    write_celeba_fixture(workdir / "jpegs", (count, 0, 0), seed=0, extract=True)
    return (
        workdir / "jpegs",
        True,
        f"{count} synthetic 178x218 JPEGs in CelebA's layout (no real CelebA here)",
    )


def run_baseline(args, device: torch.device, root: Path, synthetic: bool) -> float:
    """Images/s of the common pipeline (after 3 warm-up batches)."""
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision import datasets, transforms

    class SyntheticCelebA(datasets.CelebA):
        def _check_integrity(self) -> bool:  # the synthetic annotation files have other md5 sums
            return True

    transform = transforms.Compose([transforms.CenterCrop(148), transforms.Resize(64), transforms.ToTensor()])
    dataset = (SyntheticCelebA if synthetic else datasets.CelebA)(
        str(root), split="train", transform=transform
    )
    batch, warmup = 64, 3
    sampler = RandomSampler(
        dataset,
        num_samples=(warmup + args.baseline_steps) * batch,
        generator=torch.Generator().manual_seed(0),
    )
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers define the workload
    loader = DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=4,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    torch.manual_seed(0)
    model = VAE("conv", CELEBA_SHAPE, 128, [32, 64, 128, 256, 512], "discretized_logistic").to(device)
    objective, optimizer = ELBOObjective(model), torch.optim.Adam(model.parameters(), lr=1e-3)
    start, images = 0.0, 0
    for step, (x, _) in enumerate(loader):
        if step == warmup:
            sync(device)
            start, images = time.perf_counter(), 0
        x = x.to(device, non_blocking=True).mul_(
            255.0
        )  # ToTensor gives x / 255; the model takes 8-bit values
        reconstruction, kl_per_dim = objective(x)
        loss = reconstruction.mean() + kl_per_dim.sum(dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # public code logs the loss every step
        images += x.shape[0]
    sync(device)
    return images / (time.perf_counter() - start)


def celeba(
    base: Params, args, device: torch.device, workdir: Path
) -> tuple[list[tuple[str, str, str]], float]:
    """Rows, and the project's best train-step images/s (for the FLOP/s line)."""
    processed = workdir / "celeba"
    data = write_arrays(
        processed,
        CELEBA_SHAPE,
        {"train": args.train_images, "valid": args.valid_images},
        REPO_ROOT / "data" / "processed" / "celeba",
    )
    rows = [("**2. CelebA-64, reference conv VAE**", "", f"project data: {data}")]
    baseline = None
    if not args.skip_baseline:
        root, synthetic, jpegs = prepare_jpegs(workdir, args.baseline_jpegs)
        baseline = run_baseline(args, device, root, synthetic)
        rows.append(
            (
                "common pipeline (torchvision loader, batch 64, fp32)",
                f"{baseline:,.0f} img/s",
                f"{args.baseline_steps} batches after 3 warm-up; {jpegs}",
            )
        )
    best = 0.0
    for batch in [256, *(int(b) for b in args.extra_batch_sizes.split(",") if b)]:
        params = reference_params(
            base,
            batch_size=batch,
            epochs=args.epochs,
            cpus_per_worker=args.threads,
            use_gpu=device.type == "cuda",
            log_every_n_steps=10**9,
        )
        if device.type == "cuda" and args.full:
            torch.cuda.reset_peak_memory_stats(device)
        run = run_worker(params, processed)
        best = max(best, run["train_images_per_s"])
        ratio = f"; {run['train_images_per_s'] / baseline:.2f}x the common pipeline" if baseline else ""
        peak = (
            f"; peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
            if device.type == "cuda"
            else ""
        )
        rows.append(
            (
                f"train_worker, batch {batch}: train steps",
                f"{run['train_images_per_s']:,.0f} img/s",
                f"median of {run['epochs'] - 1 or 1} epoch(s) after the first{ratio}; precision "
                f"{params.train.precision}, channels_last {params.train.channels_last}{peak}",
            )
        )
        rows.append(
            (
                f"train_worker, batch {batch}: whole run",
                f"{run['wall_images_per_s']:,.0f} img/s",
                "validation, pictures, checkpoints and set-up included",
            )
        )
        epoch = CELEBA_SPLIT_COUNTS["train"] / run["train_images_per_s"]
        rows.append((f"train_worker, batch {batch}: one CelebA epoch", f"{epoch:,.1f} s", "162,770 images"))
    return rows, best


# ----------------------------------------------------------------------------------------------------------
# torch.compile against eager (the rule of pipeline.train_plan.should_compile)
# ----------------------------------------------------------------------------------------------------------
COMPILE_MODELS = {  # name: (architecture, hidden dims, latent, image shape, batch)
    "mlp": ("mlp", [512, 256], 32, MNIST_SHAPE, 128),
    "conv": ("conv", [32, 64, 128, 256, 512], 128, CELEBA_SHAPE, 64),
    "resnet": ("resnet", [32, 64, 128, 256], 128, CELEBA_SHAPE, 64),
}


def _run_in_process(params: Params, processed: Path, threads: int, cache: str | None) -> dict[str, Any]:
    """``run_worker`` in a fresh process (no compiled code or kernels from earlier runs in memory), with
    inductor's on-disk cache in ``cache``."""
    context = mp.get_context("spawn")
    results = context.Queue()
    saved = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # the child reads it at start
    try:
        process = context.Process(target=_trial, args=(params, str(processed), threads, results))
        process.start()
        outcome = results.get(timeout=3600)
        process.join()
    finally:
        if saved is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved
    return outcome


def compile_against_eager(
    base: Params, args, device: torch.device, workdir: Path
) -> list[tuple[str, str, str]]:
    """Each model trained eager, compiled from a cold cache (a new inductor cache folder) and compiled again
    with that cache warm (a later run of the same shapes on the machine), each in a fresh process, alternated
    ``args.repeats`` times: steady images/s (the epochs after the first), the compile time (first-epoch
    seconds over eager's) and the images after which compiling has paid for itself."""
    rows = [("**torch.compile against eager**", "",
             f"median of {args.repeats} alternated runs, each in a fresh process")]
    for name in args.compile_models.split(","):
        architecture, hidden, latent, shape, batch = COMPILE_MODELS[name]
        images = args.mlp_images if name == "mlp" else args.compile_images
        processed = workdir / f"compile-{name}"
        write_arrays(processed, shape, {"train": images, "valid": 256}, None)
        figures: dict[str, list[dict[str, Any]]] = {"eager": [], "cold": [], "warm": []}
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix="inductor-") as cache:
                for kind in figures:
                    params = base.model_copy(update={
                        "model": base.model.model_copy(update={
                            "architecture": architecture, "hidden_dims": hidden, "latent_dim": latent,
                            "likelihood": "discretized_logistic"}),
                        "train": base.train.model_copy(update={
                            "batch_size": batch, "epochs": 3, "compile": kind != "eager",
                            "cpus_per_worker": args.threads, "use_gpu": device.type == "cuda",
                            "log_every_n_steps": 10**9}),
                    })
                    figures[kind].append(_run_in_process(params, processed, args.threads, cache))
        eager = median(r["train_images_per_s"] for r in figures["eager"])
        fast = median(r["train_images_per_s"] for r in figures["cold"] + figures["warm"])
        gain = 1 / eager - 1 / fast  # seconds saved per image
        rows.append((f"{name}: eager / compiled (steady)", f"{eager:,.0f} / {fast:,.0f} img/s",
                     f"{fast / eager:.2f}x; {images} images of {shape}, batch {batch}, discretized logistic"))
        for kind in ("cold", "warm"):
            cost = median(c["first_epoch_seconds"] - e["first_epoch_seconds"]
                          for e, c in zip(figures["eager"], figures[kind], strict=True))
            payback = f"{cost / gain:,.0f} images" if gain > 0 else "never (no gain)"
            rows.append((f"{name}: compile time ({kind} cache), paid back after", f"{cost:.1f} s", payback))
    return rows


# ----------------------------------------------------------------------------------------------------------
# 3. Device limits, evaluation, trials sharing the device
# ----------------------------------------------------------------------------------------------------------
def device_limits(base: Params, device: torch.device, best: float, args) -> list[tuple[str, str, str]]:
    from torch.utils.flop_counter import FlopCounterMode

    dtype = torch.bfloat16 if device.type == "cuda" and base.train.precision != "fp32" else torch.float32
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
    matmul = 2 * size**3 / time_repeated(lambda: a @ b, device, 1.0)
    source = torch.empty(256 << 18 if device.type == "cuda" else 64 << 18, device=device)
    target = torch.empty_like(source)
    copy = 2 * source.numel() * 4 / time_repeated(lambda: target.copy_(source), device, 1.0)
    model = VAE("conv", CELEBA_SHAPE, 128, [32, 64, 128, 256, 512], "discretized_logistic")
    x = torch.randint(0, 256, (4, *CELEBA_SHAPE), dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        reconstruction, kl_per_dim = ELBOObjective(model)(x)
        (reconstruction.mean() + kl_per_dim.sum(-1).mean()).backward()
    flops = counter.get_total_flops() / 4
    rows = [
        ("**3. Device limits and model cost**", "", ""),
        (f"matmul {str(dtype).removeprefix('torch.')}", si(matmul, "FLOP/s"), f"{size}^2 matrices, this run"),
        ("device copy bandwidth", si(copy, "B/s"), "read + write, this run"),
        ("FLOPs per training image", si(flops, "FLOP"), "forward + backward, matmul/conv (FlopCounterMode)"),
    ]
    if best:  # the CelebA part ran
        rows.append(("achieved by train_worker", si(flops * best, "FLOP/s"),
                     f"{100 * flops * best / matmul:.0f}% of the matmul rate"))
    return rows


def evaluation(args, device: torch.device) -> list[tuple[str, str, str]]:
    """The K-sample NLL through pipeline.evaluate.test_figures on ``eval_images`` images of CelebA's shape."""
    torch.manual_seed(0)
    model = VAE("conv", CELEBA_SHAPE, 128, [32, 64, 128, 256, 512], "discretized_logistic")
    images = np.random.default_rng(1).integers(0, 256, size=(args.eval_images, *CELEBA_SHAPE), dtype=np.uint8)
    start = time.perf_counter()
    figures = test_figures(model, images, args.num_importance_samples, 250, 128, device)
    seconds = time.perf_counter() - start
    decodes = args.eval_images * args.num_importance_samples / seconds
    whole = CELEBA_SPLIT_COUNTS["test"] * args.num_importance_samples / decodes
    return [
        ("**Evaluation (pipeline.evaluate.test_figures)**", "", ""),
        (
            f"NLL, K={args.num_importance_samples}",
            f"{decodes:,.0f} decodes/s",
            f"{args.eval_images} images in {seconds:.1f} s ({figures['precision']})",
        ),
        (
            "the 19,962 CelebA test images",
            f"{whole:,.0f} s",
            "extrapolated" if args.eval_images < CELEBA_SPLIT_COUNTS["test"] else "measured",
        ),
    ]


def _trial(params: Params, processed: str, threads: int, results) -> None:
    torch.set_num_threads(threads)
    results.put(run_worker(params, Path(processed)))


def trials(base: Params, args, device: torch.device, workdir: Path) -> list[tuple[str, str, str]]:
    """``args.trials`` training processes at once (as Tune's fractional-GPU trials) against one alone."""
    processed = workdir / "trials"
    write_arrays(processed, CELEBA_SHAPE, {"train": args.trial_images, "valid": 256}, None)
    threads = max(1, args.threads // args.trials)
    params = reference_params(
        base,
        batch_size=256,
        epochs=2,
        cpus_per_worker=threads,
        use_gpu=device.type == "cuda",
        log_every_n_steps=10**9,
    )
    context = mp.get_context("spawn")
    figures = {}
    for count in (1, args.trials):
        results = context.Queue()
        processes = [
            context.Process(target=_trial, args=(params, str(processed), threads, results))
            for _ in range(count)
        ]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=3600) for _ in processes]
        for process in processes:
            process.join()
        figures[count] = sum(o["train_images_per_s"] for o in outcomes)
    return [
        (f"**{args.trials} trials sharing the device**", "", f"{threads} thread(s) each, batch 256"),
        ("one trial alone", f"{figures[1]:,.0f} img/s", ""),
        (
            f"{args.trials} trials together",
            f"{figures[args.trials]:,.0f} img/s",
            f"{figures[args.trials] / figures[1]:.2f}x one alone",
        ),
    ]


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------
def markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| figure | value | how / note |", "|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--full", action="store_true", help="GPU-scale sizes (CelebA epochs, the whole test split)"
    )
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of a training run"
    )
    parser.add_argument("--num-importance-samples", type=int, default=1000)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument(
        "--parts",
        default="loop,celeba,compile,limits,evaluation,trials",
        help="comma-separated parts to run: loop, celeba, compile, limits, evaluation, trials",
    )
    parser.add_argument("--compile-models", default="mlp,conv,resnet", help="models of the compile part")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    for name, value in CPU_SIZES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None)
    args = parser.parse_args(argv)
    for name, value in (FULL_SIZES if args.full else CPU_SIZES).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    base = load_params(args.params)
    parts = set(args.parts.split(","))
    load_before = other_load()
    rows: list[tuple[str, str, str]] = []
    best = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-") as workdir:
        if "loop" in parts:
            rows += loop_overhead(base, args, device, Path(workdir))
        if "celeba" in parts:
            celeba_rows, best = celeba(base, args, device, Path(workdir))
            rows += celeba_rows
        if "compile" in parts:
            rows += compile_against_eager(base, args, device, Path(workdir))
        if "limits" in parts:
            rows += device_limits(base, device, best, args)
        if "evaluation" in parts:
            rows += evaluation(args, device)
        if "trials" in parts and args.trials > 1:
            rows += trials(base, args, device, Path(workdir))
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python", "benchmarks/train_throughput.py", *map(shlex.quote, sys.argv[1:])])
    header = (
        f"### {when} · {device_name(device)}\n\n- command: `{command}`\n- commit: {commit()}; torch "
        f"{torch.__version__}, {args.threads} CPU thread(s)\n- "
        f"load average per core: {load_before:.2f} before, "
        f"{other_load():.2f} after (other jobs on a shared machine lower every figure)\n"
    )
    block = header + "\n" + markdown(rows) + "\n"
    print(block)
    if not args.no_record:
        append_to_section(SECTION, SECTION_INTRO, block)
        print(f"appended to {RESULTS_PATH}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "header": header}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
