"""Training and evaluation throughput: the common public CelebA VAE pipeline against this project's, in one run.

    .venv/bin/python benchmarks/train_throughput.py                  # CPU-sized defaults: ~4-6 min on 2 cores
    python benchmarks/train_throughput.py --device cuda --full       # GPU scale (CelebA-sized epochs, K=1000 on 19,962)

Both sides train the reference model of issue 7, ``vae.VAE("conv", (3, 64, 64), 128, [32, 64, 128, 256, 512],
likelihood)`` with the same likelihood (``--likelihood``, default the project's ``discretized_logistic``):

1. Baseline, what most public VAE code does: ``torchvision.datasets.CelebA`` + ``DataLoader`` decoding one JPEG at
   a time with ``CenterCrop(148)``, ``Resize(64)``, ``ToTensor``; 4 loader workers, batch 64, fp32, eager, Adam.
   The JPEG folder is the real ``data/raw/celeba`` when present, else real-size (178x218) JPEGs written by
   ``tests/fixtures/celeba.py`` (sampled with repetition: decoding cost does not depend on which image).
2. This project: :func:`pipeline.train_loop.train_worker` itself with a :class:`LocalSession`, on the uint8 arrays
   the preprocess stage writes: the real ``data/processed/celeba`` arrays when present, else synthetic uint8 arrays
   of the real shape (throughput does not depend on pixel values). On a GPU that is the loop's fast path: the split
   resident on the device, gather/shuffle/convert there, bf16 autocast, channels-last, fused AdamW, and
   ``torch.compile`` with ``--compile``. Figures come from the loop's own epoch timing (validation timed apart).

Plus: the model's FLOPs per image (``torch.utils.flop_counter``), achieved FLOP/s, an op-level memory-traffic
estimate, peak GPU memory, the device's own limits measured in the same run (a large matmul in the training dtype,
a device copy), the time of the K=1000 importance-sampled NLL (:func:`vae.objectives.importance_sampled_log_likelihood`
batched as in ``pipeline.evaluate.test_figures``; extrapolated to the 19,962 test images when fewer are run), the
aggregate throughput of several tune-trial-like training processes sharing the device against one alone, and a
short profile of the project's step. A table goes to stdout; the figures with the command, device, date and
commit are added to the "Training" section of ``benchmarks/RESULTS.md``.

The measured paths import only torch, numpy, this repository's ``vae/`` and ``pipeline/train_loop.py`` (plus
torchvision and PIL for the baseline). ``--strict-imports`` blocks ray, mlflow, dvc, pydantic and yaml for the
whole run, as on the GPU machine that lacks them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import gc
import importlib.abc
import json
import math
import multiprocessing as mp
import os
import platform
import queue as queue_module
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pipeline import train_loop  # noqa: E402
from pipeline.datasets import CELEBA_SPLIT_COUNTS  # noqa: E402  (stdlib-only constants)
from pipeline.train_loop import (  # noqa: E402
    BatchSource,
    LocalSession,
    build_model,
    make_optimizer,
    pick_device,
    rank_indices,
    train_worker,
    use_bf16,
)
from vae.model import VAE, ELBOObjective  # noqa: E402
from vae.objectives import importance_sampled_log_likelihood  # noqa: E402

IMAGE_SHAPE = (3, 64, 64)
IMAGE_BYTES = math.prod(IMAGE_SHAPE)
REFERENCE_HIDDEN = [32, 64, 128, 256, 512]
REFERENCE_LATENT = 128
BLOCKED_MODULES = ("ray", "mlflow", "dvc", "pydantic", "yaml")
MEASURED_PATH_FORBIDDEN = ("ray", "mlflow", "dvc", "pydantic")
RESULTS_PATH = REPO_ROOT / "benchmarks" / "RESULTS.md"
SECTION_HEADING = "## Training"

# The params.yaml sections train_worker reads, as in the repository's params.yaml; used when PyYAML is missing
# (the GPU machine). With PyYAML the file's sections are read over these.
BUILTIN_PARAMS: dict[str, Any] = {
    "model": {"architecture": "conv", "latent_dim": REFERENCE_LATENT, "hidden_dims": REFERENCE_HIDDEN,
              "likelihood": "discretized_logistic", "gaussian_std": 0.1},
    "beta_schedule": {"name": "linear", "beta_max": 1.0, "warmup_steps": 5000},
    "train": {"epochs": 30, "batch_size": 256, "optimizer": "adamw", "learning_rate": 0.001, "weight_decay": 0.0,
              "lr_schedule": "cosine", "lr_warmup_steps": 200, "grad_clip_norm": 100.0, "num_mc_samples": 1,
              "seed": 0, "precision": "auto", "num_workers": 1, "use_gpu": "auto", "cpus_per_worker": 1,
              "gpus_per_worker": 1, "data_on_device": "auto", "channels_last": True, "compile": False,
              "checkpoint_num_to_keep": 2, "max_failures": 2, "storage_path": "runs", "run_name": "vae-celeba64",
              "log_every_n_steps": 50, "use_best_params": False, "max_steps_per_epoch": None},
    "evaluate": {"num_importance_samples": 1000, "importance_batch_size": 250, "batch_size": 128,
                 "max_images": None, "attributes": ["Smiling", "Eyeglasses"], "num_image_rows": 8},
    "mlflow": {"tracking_uri": None, "experiment_name": "vae-celeba", "registered_model_name": "vae-celeba",
               "log_images_every_n_epochs": 1},
}

CPU_DEFAULTS = {
    "train_images": 2048, "valid_images": 256, "epochs": 2, "extra_batch_sizes": "64",
    "baseline_jpegs": 1024, "baseline_warmup": 3, "baseline_steps": 24,
    "eval_images": 4, "eval_batch_size": 4,
    "trials": 2, "trial_images": 1024, "trial_epochs": 3, "profile_steps": 3,
}
FULL_DEFAULTS = {
    "train_images": CELEBA_SPLIT_COUNTS["train"], "valid_images": CELEBA_SPLIT_COUNTS["valid"], "epochs": 3,
    "extra_batch_sizes": "1024", "baseline_jpegs": 2048, "baseline_warmup": 10, "baseline_steps": 200,
    "eval_images": CELEBA_SPLIT_COUNTS["test"], "eval_batch_size": None,
    "trials": 4, "trial_images": 32768, "trial_epochs": 3, "profile_steps": 5,
}


# ----------------------------------------------------------------------------------------------------------
# Imports: what the GPU machine lacks
# ----------------------------------------------------------------------------------------------------------
class _ImportBlocker(importlib.abc.MetaPathFinder):
    """Makes ``import ray`` (and the other BLOCKED_MODULES) fail as on a machine without them."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED_MODULES:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by --strict-imports)", name=name)
        return None


def block_imports() -> None:
    if not any(isinstance(finder, _ImportBlocker) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ImportBlocker())


def ensure_tracking_importable() -> str:
    """train_worker imports pipeline.tracking, which (like pipeline.common) needs the standard library only."""
    import pipeline.tracking  # noqa: F401

    return "pipeline.tracking imported as is (standard library + numpy)"


def forbidden_modules_loaded() -> list[str]:
    return sorted(name for name in MEASURED_PATH_FORBIDDEN if name in sys.modules)


# ----------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def si(value: float | None, unit: str, digits: int = 3) -> str:
    """1.23e12 -> '1.23 T<unit>'."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}"
    return f"{value:.{digits}g} {unit}"


def rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} img/s"


def seconds_text(value: float | None) -> str:
    if value is None:
        return "n/a"
    if value >= 3600:
        return f"{value:,.0f} s ({value / 3600:.1f} h)"
    return f"{value:,.1f} s"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores visible (torch CPU capability {torch.backends.cpu.get_cpu_capability()})"


def cpu_seconds() -> tuple[float, float]:
    """(CPU-seconds busy on the whole machine, CPU-seconds of this process and its reaped children) so far."""
    busy = float("nan")
    with contextlib.suppress(OSError, ValueError, IndexError):
        values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
        busy = (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = sum(getattr(resource.getrusage(who), field) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for field in ("ru_utime", "ru_stime"))
    return busy, own


class OtherLoad:
    """Share of the machine's cores that OTHER processes used between start() and stop(): /proc/stat busy time
    minus this process's and its reaped children's CPU time. Each measured phase carries its own figure."""

    def __init__(self):
        self.busy, self.own, self.wall = *cpu_seconds(), time.time()

    def stop(self) -> float:
        busy, own = cpu_seconds()
        share = ((busy - self.busy) - (own - self.own)) / ((os.cpu_count() or 1) * max(1e-9, time.time() - self.wall))
        return max(0.0, share) if math.isfinite(share) else float("nan")


def load_text(share: float | None) -> str:
    return "" if share is None or not math.isfinite(share) else f"; other load {100 * share:.0f}%"


def process_cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of other live processes (the DataLoader's workers), from /proc/<pid>/stat."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + (" (with uncommitted changes to tracked files)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git here)"


def command_line() -> str:
    script = Path(sys.argv[0])
    with contextlib.suppress(ValueError):
        script = script.resolve().relative_to(REPO_ROOT)
    return " ".join(["python", shlex.quote(str(script)), *map(shlex.quote, sys.argv[1:])])


def time_repeated(function, device: torch.device, min_seconds: float, min_reps: int = 3) -> tuple[float, int]:
    """(seconds, repetitions) of calling ``function`` until both minimums are reached (after one warm-up call)."""
    function()
    sync(device)
    reps, start = 0, time.perf_counter()
    while True:
        function()
        reps += 1
        if reps >= min_reps:
            sync(device)
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                return elapsed, reps


# ----------------------------------------------------------------------------------------------------------
# Params
# ----------------------------------------------------------------------------------------------------------
def load_base_params(path: Path) -> tuple[dict[str, Any], str]:
    """The sections train_worker reads: from ``path`` when PyYAML is here, else the built-in copy. Validated by
    pipeline.config when pydantic is here (outside the measured path)."""
    params = copy.deepcopy(BUILTIN_PARAMS)
    source = "built-in copy of params.yaml's model/train/beta_schedule/evaluate/mlflow sections"
    try:
        import yaml
    except ImportError:
        source += " (no PyYAML here)"
    else:
        raw = yaml.safe_load(path.read_text()) or {}
        for section in params:
            if isinstance(raw.get(section), dict):
                if section == "beta_schedule":
                    params[section] = dict(raw[section])
                else:
                    params[section].update(raw[section])
        source = f"{path} (sections {', '.join(params)})"
    try:
        from pipeline.config import parse_params
    except ImportError:
        return params, source + "; not validated (no pydantic here)"
    dumped = parse_params(params, "benchmark params").model_dump(mode="json")
    return {section: dumped[section] for section in params}, source + "; validated by pipeline.config"


def project_config(base: dict[str, Any], args, device: torch.device, processed_dir: Path, *, batch_size: int,
                   epochs: int, threads: int, seed: int | None = None) -> dict[str, Any]:
    """The config dict train_worker takes: the reference model, this run's sizes, the device, the CLI's knobs."""
    params = copy.deepcopy(base)
    params["model"].update(architecture="conv", latent_dim=REFERENCE_LATENT, hidden_dims=list(REFERENCE_HIDDEN),
                           likelihood=args.likelihood)
    train = params["train"]
    train.update(epochs=epochs, batch_size=batch_size, num_workers=1, use_gpu=device.type == "cuda",
                 cpus_per_worker=threads, max_steps_per_epoch=None)
    if seed is not None:
        train["seed"] = seed
    for key in ("precision", "channels_last", "compile", "data_on_device"):
        value = getattr(args, key)
        if value is not None:
            train[key] = value
    return {"params": params, "processed_dir": str(processed_dir)}


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def random_images(rng: np.random.Generator, count: int) -> np.ndarray:
    return np.frombuffer(rng.bytes(count * IMAGE_BYTES), dtype=np.uint8).reshape(count, *IMAGE_SHAPE)


def write_arrays(folder: Path, source_dir: Path | None, counts: dict[str, int], seed: int = 0) -> None:
    """train/valid/test_images.npy in ``folder``: the first N images of the real arrays in ``source_dir``, or
    synthetic uint8 of the real shape."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split, count in counts.items():
        if source_dir is not None:
            real = np.load(source_dir / f"{split}_images.npy", mmap_mode="r")
            if count > real.shape[0]:
                raise SystemExit(f"--{split}-images {count}: the real {split} split has only {real.shape[0]} images")
            np.save(folder / f"{split}_images.npy", np.ascontiguousarray(real[:count]))
        else:
            np.save(folder / f"{split}_images.npy", random_images(rng, count))


def real_arrays(processed_dir: Path) -> bool:
    if not all((processed_dir / f"{split}_images.npy").is_file() for split in ("train", "valid", "test")):
        return False
    shape = np.load(processed_dir / "train_images.npy", mmap_mode="r").shape
    return tuple(shape[1:]) == IMAGE_SHAPE


def prepare_jpegs(celeba_root: Path, workdir: Path, count: int) -> tuple[Path, bool, str]:
    """(torchvision root, is_fixture, description) of the baseline's JPEG folder."""
    folder = celeba_root / "celeba"
    if (folder / "img_align_celeba").is_dir() and (folder / "list_eval_partition.txt").is_file():
        return celeba_root, False, f"real CelebA JPEGs in {folder}"
    from tests.fixtures.celeba import write_celeba_fixture

    root = workdir / "jpegs"
    start = time.perf_counter()
    write_celeba_fixture(root, (count, 0, 0), seed=0, extract=True)
    return root, True, (f"{count} synthetic 178x218 JPEGs (quality 90) in CelebA's layout, written by "
                        f"tests/fixtures/celeba.py in {time.perf_counter() - start:.0f} s; no real CelebA here")


# ----------------------------------------------------------------------------------------------------------
# Device limits, FLOPs, memory traffic
# ----------------------------------------------------------------------------------------------------------
def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, min_seconds: float) -> float:
    """FLOP/s of a (size x size) @ (size x size) matmul in ``dtype``."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    seconds, reps = time_repeated(lambda: torch.matmul(a, b, out=out), device, min_seconds)
    return 2.0 * size**3 * reps / seconds


def copy_bandwidth(device: torch.device, nbytes: int, min_seconds: float) -> float:
    """Bytes/s moved (read + write) by a device-to-device copy of ``nbytes``."""
    source = torch.empty(nbytes // 4, device=device).uniform_()
    target = torch.empty_like(source)
    seconds, reps = time_repeated(lambda: target.copy_(source), device, min_seconds)
    return 2.0 * nbytes * reps / seconds


def host_to_device_bandwidth(device: torch.device, nbytes: int, min_seconds: float) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    seconds, reps = time_repeated(lambda: target.copy_(host, non_blocking=True), device, min_seconds)
    return nbytes * reps / seconds


def count_flops(likelihood: str, gaussian_std: float, batch: int = 4) -> dict[str, float]:
    """Matmul/conv FLOPs per image of the reference model (torch.utils.flop_counter, eager fp32 on the CPU; the
    count does not depend on device or dtype): a training step (forward + backward), a forward, one decode."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = VAE("conv", IMAGE_SHAPE, REFERENCE_LATENT, REFERENCE_HIDDEN, likelihood, gaussian_std)
    objective = ELBOObjective(model)
    x = torch.randint(0, 256, (batch, *IMAGE_SHAPE), dtype=torch.uint8)
    with FlopCounterMode(display=False) as train_counter:
        reconstruction, kl_per_dim = objective(x)
        (reconstruction.mean() + kl_per_dim.sum(dim=-1).mean()).backward()
    with torch.no_grad(), FlopCounterMode(display=False) as forward_counter:
        objective(x)
    with torch.no_grad(), FlopCounterMode(display=False) as decode_counter:
        model.decode(torch.randn(batch, REFERENCE_LATENT))
    return {"train": train_counter.get_total_flops() / batch, "forward": forward_counter.get_total_flops() / batch,
            "decode": decode_counter.get_total_flops() / batch,
            "parameters": float(sum(p.numel() for p in model.parameters()))}


class _TrafficCounter(TorchDispatchMode):
    """Sums the bytes every (non-view) aten op reads and writes: the DRAM traffic of an eager step if each op
    read its inputs and wrote its outputs once (no fusion, no cache reuse): an estimate, not a measurement."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    @staticmethod
    def _size(tensor: torch.Tensor) -> int:
        with contextlib.suppress(Exception):
            return min(tensor.numel() * tensor.element_size(), tensor.untyped_storage().nbytes())
        return tensor.numel() * tensor.element_size()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False) and func is not torch.ops.aten.detach.default:
            leaves = pytree.tree_leaves((args, kwargs or {}, out))
            self.bytes += sum(self._size(t) for t in leaves if isinstance(t, torch.Tensor))
        return out


class ProjectStep:
    """One optimisation step built from train_loop's pieces exactly as train_worker builds them (model, memory
    format, compile, fused optimizer, autocast, loss, clipping and the NaN check's syncs); for the profile and
    the traffic count. Throughput figures come from train_worker itself, not from this."""

    def __init__(self, params: dict[str, Any], device: torch.device, channels_last: bool | None = None):
        train = params["train"]
        self.device = device
        self.model = build_model(params, IMAGE_SHAPE).to(device)
        if channels_last is None:  # train_loop's rule at the time of writing; main() passes what train_worker did
            channels_last = device.type == "cuda" and train["channels_last"]
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        objective: torch.nn.Module = ELBOObjective(self.model)
        self.objective = torch.compile(objective) if train["compile"] else objective
        self.optimizer = make_optimizer(self.model, train, device)
        self.bf16 = use_bf16(train["precision"], device)
        self.clip = train["grad_clip_norm"] or float("inf")
        self.num_samples = train["num_mc_samples"]

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def __call__(self, x: torch.Tensor) -> None:
        with self.autocast():
            reconstruction, kl_per_dim = self.objective(x, self.num_samples)
        reconstruction, kl = reconstruction.float(), kl_per_dim.float().sum(dim=-1)
        loss = reconstruction.mean() + kl.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        if not (math.isfinite(loss.item()) and math.isfinite(grad_norm.item())):
            raise RuntimeError("non-finite loss in the benchmark step")
        self.optimizer.step()


def step_traffic_per_image(params: dict[str, Any], device: torch.device, batch: int, channels_last: bool | None) -> float:
    """Bytes per image of one project step (gather + forward + backward + clip + optimizer), eager op level."""
    step = ProjectStep({**params, "train": {**params["train"], "compile": False}}, device, channels_last)
    images = torch.randint(0, 256, (batch * 2, *IMAGE_SHAPE), dtype=torch.uint8, device=device)
    indices = torch.randperm(batch * 2, device=device)[:batch]
    step(images.index_select(0, indices))  # warm-up: optimizer state exists, as in steady state
    counter = _TrafficCounter()
    with counter:
        step(images.index_select(0, indices))
    sync(device)
    return counter.bytes / batch


def profile_step(params: dict[str, Any], device: torch.device, images: np.ndarray, batch: int, steps: int,
                 rows: int, channels_last: bool | None) -> dict[str, Any]:
    """torch.profiler over ``steps`` project steps (batch gather from BatchSource included) after 2 warm-up steps."""
    from torch.profiler import ProfilerActivity, profile

    step = ProjectStep(params, device, channels_last)
    source = BatchSource(images, device, on_device=device.type == "cuda")
    indices = torch.randperm(images.shape[0])
    batches = max(1, images.shape[0] // batch)

    def run(count: int) -> None:
        done = 0
        while done < count:
            for x in source.batches(indices, batch, min(batches, count - done)):
                step(x)
                done += 1

    run(2)
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities) as profiler:
        run(steps)
        sync(device)
    wall = time.perf_counter() - start
    averages = profiler.key_averages()
    on_gpu = device.type == "cuda"
    sort_key = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    table = averages.table(sort_by=sort_key, row_limit=rows)

    def self_time(event) -> float:
        return float(getattr(event, sort_key, 0.0) or 0.0)

    total = sum(self_time(e) for e in averages) or 1.0
    top = sorted(averages, key=self_time, reverse=True)[:rows]
    return {"table": table, "wall_ms_per_step": 1e3 * wall / steps, "clock": "GPU kernel" if on_gpu else "CPU",
            "top": [{"op": e.key, "ms_per_step": self_time(e) / 1e3 / steps, "share": self_time(e) / total,
                     "calls_per_step": e.count / steps} for e in top]}


# ----------------------------------------------------------------------------------------------------------
# 1. Baseline
# ----------------------------------------------------------------------------------------------------------
def run_baseline(args, device: torch.device, jpeg_root: Path, fixture: bool) -> dict[str, Any]:
    from torch.utils.data import DataLoader, RandomSampler
    from torchvision import datasets, transforms

    class FixtureCelebA(datasets.CelebA):
        """torchvision's CelebA, except that the integrity check accepts the fixture's annotation files (their md5
        is not the official one). Loading and decoding are torchvision's own."""

        def _check_integrity(self) -> bool:
            return os.path.isdir(os.path.join(self.root, self.base_folder, "img_align_celeba"))

    transform = transforms.Compose([transforms.CenterCrop(148), transforms.Resize(64), transforms.ToTensor()])
    dataset = (FixtureCelebA if fixture else datasets.CelebA)(str(jpeg_root), split="train", transform=transform,
                                                               download=False)
    batch = args.baseline_batch_size
    total_batches = args.baseline_warmup + args.baseline_steps
    sampler = RandomSampler(dataset, replacement=False, num_samples=total_batches * batch,
                            generator=torch.Generator().manual_seed(0))
    # On a 2-core machine torch warns that 4 workers exceed its suggestion; 4 is the workload's definition.
    warnings.filterwarnings("ignore", message="This DataLoader will create")
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=args.baseline_workers,
                        pin_memory=device.type == "cuda", drop_last=True)
    torch.manual_seed(0)
    model = VAE("conv", IMAGE_SHAPE, REFERENCE_LATENT, REFERENCE_HIDDEN, args.likelihood, args.gaussian_std).to(device)
    objective = ELBOObjective(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    iterator = iter(loader)
    workers = [w.pid for w in getattr(iterator, "_workers", [])]  # to read the loader workers' CPU time
    data_wait, images, running_loss, start = 0.0, 0, 0.0, time.perf_counter()
    cpu_start = time.process_time() + process_cpu_seconds(workers)
    for step in range(total_batches):
        if step == args.baseline_warmup:  # loader workers started, first batches done: steady state from here
            sync(device)
            data_wait, images, start = 0.0, 0, time.perf_counter()
            cpu_start = time.process_time() + process_cpu_seconds(workers)
        waited = time.perf_counter()
        x, _ = next(iterator)
        data_wait += time.perf_counter() - waited
        # ToTensor gives x / 255; the model takes 8-bit values (it scales to [-1, 1] itself): same math.
        x = x.to(device, non_blocking=True).mul_(255.0)
        reconstruction, kl_per_dim = objective(x)
        loss = reconstruction.mean() + kl_per_dim.sum(dim=-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        running_loss += loss.item()  # public code logs the loss every step
        images += x.shape[0]
    sync(device)
    seconds = time.perf_counter() - start
    cpu = time.process_time() + process_cpu_seconds(workers) - cpu_start
    del iterator, loader
    return {"images_per_s": images / seconds, "images": images, "seconds": seconds,
            "cpu_seconds_per_image": cpu / images if workers else None,
            "data_wait_share": data_wait / seconds, "loss": running_loss / total_batches,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "dataset_size": len(dataset)}


# ----------------------------------------------------------------------------------------------------------
# 2. Project: train_worker with a LocalSession
# ----------------------------------------------------------------------------------------------------------
class TimedSession(LocalSession):
    """LocalSession that also notes when each epoch's report (and checkpoint) happens (wall clock)."""

    def __init__(self, directory: Path | str):
        super().__init__(directory, num_to_keep=1)
        self.report_times: list[tuple[float, float]] = []
        self.report_cpu: list[float] = []  # process CPU seconds (all threads) at each report

    def report(self, metrics, state, epoch):
        before = time.time()
        super().report(metrics, state, epoch)
        self.report_times.append((before, time.time()))
        self.report_cpu.append(time.process_time())


@contextlib.contextmanager
def instrument_train_loop(device: torch.device, sink: list[float], applied: dict[str, Any] | None = None):
    """Time train_loop.evaluate_elbo (the per-epoch validation) so the training steps can be timed apart, and note
    in ``applied`` what train_worker actually did: model memory format (seen when it wraps the model in
    ELBOObjective), whether the train split went to the device (its BatchSource). The loop itself is unchanged."""
    original = train_loop.evaluate_elbo
    original_objective, original_source = train_loop.ELBOObjective, train_loop.BatchSource
    applied = applied if applied is not None else {}

    class NotingObjective(original_objective):
        def __init__(self, model):
            super().__init__(model)
            weights = [p for p in model.parameters() if p.dim() == 4]
            applied["channels_last_applied"] = bool(weights) and all(
                p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in weights)

    class NotingSource(original_source):
        def __init__(self, images, device, on_device):
            super().__init__(images, device, on_device)
            applied.setdefault("data_on_device_applied", on_device)

    def timed(*args, **kwargs):
        sync(device)
        start = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sync(device)
            sink.append(time.perf_counter() - start)

    train_loop.evaluate_elbo = timed
    train_loop.ELBOObjective, train_loop.BatchSource = NotingObjective, NotingSource
    try:
        yield applied
    finally:
        train_loop.evaluate_elbo = original
        train_loop.ELBOObjective, train_loop.BatchSource = original_objective, original_source


def summarize_run(history: list[dict[str, Any]], batch: int, validation: list[float],
                  report_times: list[tuple[float, float]], start: float, report_cpu: list[float] | None = None,
                  cpu_start: float = 0.0) -> dict[str, Any]:
    """Per-epoch figures from train_worker's history; steady state = the epochs after the first (warm-up:
    cuDNN/allocator/compile) when there are several."""
    epochs, previous_step, previous_time = [], 0, start
    for index, record in enumerate(history):
        images = (int(record["step"]) - previous_step) * batch
        epoch_seconds = float(record["epoch_seconds"])
        validation_seconds = validation[index] if index < len(validation) else 0.0
        end = report_times[index][1] if index < len(report_times) else previous_time
        epochs.append({"images": images, "epoch_seconds": epoch_seconds, "validation_seconds": validation_seconds,
                       "train_seconds": epoch_seconds - validation_seconds, "wall_seconds": end - previous_time,
                       "start": previous_time, "end": end,
                       "train_negative_elbo": float(record["train_negative_elbo"])})
        previous_step, previous_time = int(record["step"]), end
    steady = epochs[1:] if len(epochs) > 1 else epochs
    images = sum(e["images"] for e in steady)
    cpu_per_image = None
    if report_cpu and len(report_cpu) == len(epochs):
        first = report_cpu[0] if len(epochs) > 1 else cpu_start
        cpu_per_image = (report_cpu[-1] - first) / images
    return {
        "cpu_seconds_per_image": cpu_per_image,
        "epochs": epochs, "steady_epochs": len(steady), "images_per_epoch": steady[-1]["images"],
        "train_images_per_s": images / sum(e["train_seconds"] for e in steady),
        "epoch_images_per_s": images / sum(e["epoch_seconds"] for e in steady),
        "wall_images_per_s": images / sum(e["wall_seconds"] for e in steady),
        "epoch_seconds": sum(e["epoch_seconds"] for e in steady) / len(steady),
        "validation_seconds": sum(e["validation_seconds"] for e in steady) / len(steady),
        "first_epoch_seconds": epochs[0]["wall_seconds"],
        "steady_start": steady[0]["start"], "steady_end": steady[-1]["end"], "steady_images": images,
    }


def run_project(config: dict[str, Any], device: torch.device, directory: Path) -> dict[str, Any]:
    train = config["params"]["train"]
    validation: list[float] = []
    session = TimedSession(directory)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start, cpu_start = time.time(), time.process_time()
    applied: dict[str, Any] = {"autocast_bf16": use_bf16(train["precision"], device), "compile": train["compile"]}
    with instrument_train_loop(device, validation, applied):
        result = train_worker(config, session)
    summary = summarize_run(result["history"], train["batch_size"], validation, session.report_times, start,
                            session.report_cpu, cpu_start)
    summary["wall_seconds"] = time.time() - start
    summary["peak_gpu_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    summary["batch_size"] = train["batch_size"]
    summary["session_dir"] = str(directory)
    summary["applied"] = applied
    return summary


# ----------------------------------------------------------------------------------------------------------
# 3. Evaluation: importance-sampled NLL
# ----------------------------------------------------------------------------------------------------------
def run_evaluation(model: VAE, images: np.ndarray, device: torch.device, num_samples: int, chunk_size: int,
                   batch_size: int, seed: int = 0) -> dict[str, Any]:
    """The NLL loop of pipeline.evaluate.test_figures (uint8 test split on the device on GPUs, likelihood
    target, bf16 autocast on GPUs, importance_sampled_log_likelihood over ``batch_size`` images x
    ``chunk_size`` samples per decoder pass); one warm-up batch first."""
    model = model.to(device).eval()
    source = BatchSource(images, device, on_device=device.type == "cuda")
    indices = rank_indices(images.shape[0], 1, 0, 0, 0, 1, shuffle=False)
    generator = torch.Generator(device=device).manual_seed(seed)
    bf16 = use_bf16("auto", device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    first = next(source.all_batches(indices, batch_size))
    with autocast():
        importance_sampled_log_likelihood(model, first, min(chunk_size, num_samples), chunk_size, None, generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x in source.all_batches(indices, batch_size):
        target = model.likelihood.prepare_target(x, generator)
        with autocast():
            log_px = importance_sampled_log_likelihood(model, x, num_samples, chunk_size, target, generator)
        total += log_px.double().sum()
    sync(device)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "images": images.shape[0], "nll": -float(total) / images.shape[0],
            "decodes_per_s": images.shape[0] * num_samples / seconds,
            "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def run_test_figures(model: VAE, images: np.ndarray, device: torch.device, num_samples: int, chunk_size: int,
                     batch_size: int) -> dict[str, Any]:
    """pipeline.evaluate.test_figures itself, timed."""
    from pipeline.evaluate import test_figures  # torch + numpy + vae only at import time
    sync(device)
    start = time.perf_counter()
    figures = test_figures(model, images, num_samples, chunk_size, batch_size, device)
    sync(device)
    return {"seconds": time.perf_counter() - start, "nll": figures["test_nll"], "images": images.shape[0]}


# ----------------------------------------------------------------------------------------------------------
# 4. Tune-trial-like loops sharing the device
# ----------------------------------------------------------------------------------------------------------
def _trial_main(config: dict[str, Any], directory: str, threads: int, strict: bool, results) -> None:
    """Child process: one trial = train_worker on its own LocalSession (spawned: CUDA needs it)."""
    try:
        if strict:
            block_imports()
        ensure_tracking_importable()
        torch.set_num_threads(threads)
        device = pick_device(config["params"]["train"]["use_gpu"])
        validation: list[float] = []
        session = TimedSession(directory)
        start = time.time()
        with instrument_train_loop(device, validation), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            result = train_worker(config, session)
        loaded = forbidden_modules_loaded()
        summary = summarize_run(result["history"], config["params"]["train"]["batch_size"], validation,
                                session.report_times, start)
        results.put({"ok": True, "forbidden_loaded": loaded, **summary})
    except BaseException:  # noqa: BLE001 - report anything to the parent
        results.put({"ok": False, "error": traceback.format_exc()})


def run_trials(count: int, configs: list[dict[str, Any]], threads: int, strict: bool, workdir: Path,
               timeout_s: float) -> dict[str, Any]:
    """Start ``count`` trial processes at once; aggregate = all their steady-state images / the span from the
    first steady start to the last end (idle skew counts against it); overlap = intersection / union."""
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = []
    for index in range(count):
        directory = workdir / f"trial-{count}-{index}"
        process = context.Process(target=_trial_main, args=(configs[index], str(directory), threads, strict, results))
        process.start()
        processes.append(process)
    outcomes, deadline = [], time.time() + timeout_s
    while len(outcomes) < count:
        try:
            outcomes.append(results.get(timeout=5))
        except queue_module.Empty:
            if time.time() > deadline:
                break
            dead = [p for p in processes if p.exitcode not in (None, 0)]
            if dead and len(outcomes) + len(dead) >= count:
                break
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.terminate()
    failures = [o["error"] for o in outcomes if not o["ok"]]
    if failures or len(outcomes) < count:
        raise RuntimeError("trial processes failed:\n" + ("\n".join(failures) or f"{count - len(outcomes)} gave no result"))
    starts = [o["steady_start"] for o in outcomes]
    ends = [o["steady_end"] for o in outcomes]
    union = max(ends) - min(starts)
    intersection = max(0.0, min(ends) - max(starts))
    return {"trials": count, "aggregate_images_per_s": sum(o["steady_images"] for o in outcomes) / union,
            "per_trial_images_per_s": [o["wall_images_per_s"] for o in outcomes],
            "forbidden_loaded": sorted({m for o in outcomes for m in o["forbidden_loaded"]}),
            "overlap": intersection / union if union > 0 else 0.0}


# ----------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------
def render_table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = []
    for name, value, note in rows:
        if value == "" and note == "":
            lines.append(f"\n{name}")
            continue
        lines.append(f"  {name:<{widths[0]}}  {value:>{widths[1]}}  {note}")
    return "\n".join(lines)


def render_markdown(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| figure | value | how / note |", "|---|---:|---|"]
    for name, value, note in rows:
        if value == "" and note == "":
            lines.append(f"| **{name}** | | |")
        else:
            lines.append(f"| {name} | {value} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def append_to_section(path: Path, heading: str, intro: str, block: str) -> None:
    """Add ``block`` at the end of the ``heading`` section of ``path`` (creating the file or the section), leaving
    every other section as it is."""
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    if start is None:
        new = text.rstrip("\n") + f"\n\n{heading}\n\n{intro.strip()}\n\n{block.strip()}\n"
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before = "\n".join(lines[:end]).rstrip("\n")
        after = "\n".join(lines[end:])
        new = f"{before}\n\n{block.strip()}\n" + (f"\n{after}\n" if after else "")
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)


SECTION_INTRO = """\
Written by `benchmarks/train_throughput.py` (one block per run, newest last). Baseline: torchvision `CelebA` +
`DataLoader` (JPEG decode per image, `CenterCrop(148)`, `Resize(64)`, `ToTensor`, 4 workers, batch 64, fp32,
eager, Adam). Project: `pipeline.train_loop.train_worker` with a `LocalSession` on the uint8 arrays (synthetic
of the real shape when CelebA is not present; the run says which). Same reference model and likelihood on both
sides. "Train steps" excludes the per-epoch validation, which the project's epoch figure includes."""


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when torch sees a GPU, else cpu")
    parser.add_argument("--full", action="store_true",
                        help="GPU-scale sizes: CelebA-sized splits (162,770 / 19,867), K=1000 over 19,962 test images, "
                             "4 trials; explicit flags still override")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch CPU threads")
    parser.add_argument("--likelihood", default="discretized_logistic", help="p(x|z), the same on both sides")
    parser.add_argument("--gaussian-std", type=float, default=0.1)
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--processed-dir", type=Path, default=REPO_ROOT / "data" / "processed" / "celeba",
                        help="real uint8 arrays; synthetic ones of the real shape are used when absent")
    parser.add_argument("--celeba-root", type=Path, default=REPO_ROOT / "data" / "raw" / "celeba",
                        help="torchvision CelebA root (celeba/img_align_celeba/); fixture JPEGs when absent")
    sizes = parser.add_argument_group("sizes (defaults: CPU-sized; --full: GPU-sized)")
    sizes.add_argument("--train-images", type=int)
    sizes.add_argument("--valid-images", type=int)
    sizes.add_argument("--epochs", type=int, help="project epochs; the first is warm-up, the rest are measured")
    sizes.add_argument("--batch-size", type=int, help="project batch (default: params' train.batch_size)")
    sizes.add_argument("--extra-batch-sizes", help="comma list: more project runs at these batch sizes")
    sizes.add_argument("--baseline-jpegs", type=int, help="fixture JPEGs to write when no real CelebA")
    sizes.add_argument("--baseline-steps", type=int)
    sizes.add_argument("--baseline-warmup", type=int)
    sizes.add_argument("--baseline-batch-size", type=int, default=64)
    sizes.add_argument("--baseline-workers", type=int, default=4)
    sizes.add_argument("--eval-images", type=int, help="test images for the K-sample NLL (extrapolated to 19,962)")
    sizes.add_argument("--eval-batch-size", type=int, help="default: params' evaluate.batch_size (CPU: 8)")
    sizes.add_argument("--importance-samples", type=int, help="K (default: params' evaluate.num_importance_samples)")
    sizes.add_argument("--importance-batch-size", type=int, help="default: params' evaluate.importance_batch_size")
    sizes.add_argument("--trials", type=int, help="concurrent trial processes sharing the device (0: skip)")
    sizes.add_argument("--trial-images", type=int)
    sizes.add_argument("--trial-epochs", type=int)
    sizes.add_argument("--trial-batch-size", type=int, default=256)
    sizes.add_argument("--profile-steps", type=int, help="project steps under torch.profiler (0: skip)")
    sizes.add_argument("--profile-rows", type=int, default=12)
    knobs = parser.add_argument_group("project knobs (default: params.yaml's values)")
    knobs.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    knobs.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction, default=None)
    knobs.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction, default=None)
    knobs.add_argument("--data-on-device", dest="data_on_device", choices=["auto", "always", "never"])
    knobs.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True (both sides)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--no-test-figures", action="store_true", help="skip timing pipeline.evaluate.test_figures")
    parser.add_argument("--strict-imports", action="store_true",
                        help="block ray/mlflow/dvc/pydantic/yaml imports for the whole run (as on the GPU machine)")
    parser.add_argument("--results", type=Path, default=RESULTS_PATH, help="markdown file to add the figures to")
    parser.add_argument("--no-record", action="store_true", help="do not write the results file")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--keep-workdir", action="store_true")
    args = parser.parse_args(argv)
    defaults = FULL_DEFAULTS if args.full else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.strict_imports:
        block_imports()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA GPU here", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if (args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())) \
        else torch.device("cpu")
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    on_gpu = device.type == "cuda"
    torch.set_num_threads(args.threads)
    base_params, params_source = load_base_params(args.params)
    tracking_note = ensure_tracking_importable()
    batch_size = args.batch_size or int(base_params["train"]["batch_size"])
    extra_batches = [int(b) for b in str(args.extra_batch_sizes or "").split(",") if b.strip()]
    evaluation = base_params["evaluate"]
    num_samples = args.importance_samples or int(evaluation["num_importance_samples"])
    chunk_size = args.importance_batch_size or int(evaluation["importance_batch_size"])
    eval_batch = args.eval_batch_size or int(evaluation["batch_size"])
    eval_batch = min(eval_batch, args.eval_images)
    workdir = Path(tempfile.mkdtemp(prefix="train-throughput-"))
    name = device_name(device)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    load_start = os.getloadavg()[0]
    busy_start, own_start, wall_start = *cpu_seconds(), time.time()
    figures: dict[str, Any] = {"command": command_line(), "device": name, "date": when, "commit": git_commit(),
                               "torch": torch.__version__, "threads": args.threads}
    print(f"[bench] {figures['command']}\n[bench] device: {name} | torch {torch.__version__} | {args.threads} CPU threads"
          f" | {when} | commit {figures['commit']}\n[bench] params: {params_source}\n[bench] tracking: {tracking_note}")
    try:
        # -------------------------------------------------------------------------------------- data
        real = real_arrays(args.processed_dir)
        data_note = (f"real CelebA arrays from {args.processed_dir} (first N images)" if real else
                     "SYNTHETIC uint8 arrays of the real shape (N, 3, 64, 64): no CelebA arrays here; "
                     "throughput does not depend on pixel values")
        processed = workdir / "processed"
        write_arrays(processed, args.processed_dir if real else None,
                     {"train": args.train_images, "valid": args.valid_images, "test": args.eval_images})
        print(f"[bench] project data: {data_note}")
        figures["project_data"] = data_note

        # ------------------------------------------------------------------------- device limits, FLOPs
        train_dtype = torch.bfloat16 if use_bf16(args.precision or base_params["train"]["precision"], device) else torch.float32
        limits = {
            "matmul_train_dtype": matmul_rate(device, train_dtype, 8192 if on_gpu else 2048, 1.0),
            "matmul_fp32": matmul_rate(device, torch.float32, 8192 if on_gpu else 2048, 1.0) if train_dtype != torch.float32 else None,
            "copy": copy_bandwidth(device, (1 << 30) if on_gpu else (256 << 20), 1.0),
            "host_to_device": host_to_device_bandwidth(device, 1 << 30, 1.0) if on_gpu else None,
        }
        limits["matmul_fp32"] = limits["matmul_fp32"] or limits["matmul_train_dtype"]
        figures["limits"] = limits
        flops = count_flops(args.likelihood, args.gaussian_std)
        figures["flops"] = flops
        print(f"[bench] limits: matmul {si(limits['matmul_train_dtype'], 'FLOP/s')} ({str(train_dtype)[6:]}), "
              f"copy {si(limits['copy'], 'B/s')}; model {si(flops['train'], 'FLOP')}/image per training step")

        # ------------------------------------------------------------------------------ 1. baseline
        baseline = None
        if not args.skip_baseline:
            jpeg_root, fixture, jpeg_note = prepare_jpegs(args.celeba_root, workdir, args.baseline_jpegs)
            print(f"[bench] baseline JPEGs: {jpeg_note}")
            figures["baseline_data"] = jpeg_note
            figures["baseline_fixture"] = fixture
            torch.set_num_threads(args.threads)
            meter = OtherLoad()
            baseline = run_baseline(args, device, jpeg_root, fixture)
            baseline["other_load"] = meter.stop()
            figures["baseline"] = baseline
            print(f"[bench] baseline: {rate(baseline['images_per_s'])} ({baseline['images']} images, "
                  f"{100 * baseline['data_wait_share']:.0f}% of the time waiting for the loader)")
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()

        # ------------------------------------------------------------------------------- 2. project
        runs = []
        for index, batch in enumerate([batch_size, *extra_batches]):
            config = project_config(base_params, args, device, processed, batch_size=batch, epochs=args.epochs,
                                    threads=args.threads)
            print(f"[bench] project: train_worker, batch {batch}, {args.epochs} epochs of {args.train_images} images")
            meter = OtherLoad()
            summary = run_project(config, device, workdir / f"project-{index}")
            summary["other_load"] = meter.stop()
            summary["train_knobs"] = {k: config["params"]["train"][k] for k in
                                      ("precision", "channels_last", "compile", "data_on_device", "optimizer")}
            runs.append(summary)
            print(f"[bench] project batch {batch}: {rate(summary['train_images_per_s'])} train steps, "
                  f"{rate(summary['epoch_images_per_s'])} per epoch incl. validation")
        project = runs[0]
        torch.set_num_threads(args.threads)
        figures["project"] = runs
        forbidden = forbidden_modules_loaded()
        figures["forbidden_modules_loaded"] = forbidden
        channels_last = project["applied"].get("channels_last_applied")
        traffic = step_traffic_per_image(config_params(base_params, args, device, processed, batch_size), device,
                                         batch_size, channels_last)
        figures["traffic_bytes_per_image"] = traffic

        # --------------------------------------------------------------------------------- profile
        profile = None
        if args.profile_steps:
            profile_images = np.load(processed / "train_images.npy", mmap_mode="r")
            profile = profile_step(config_params(base_params, args, device, processed, batch_size), device,
                                   profile_images, batch_size, args.profile_steps, args.profile_rows, channels_last)
            figures["profile"] = {k: v for k, v in profile.items() if k != "table"}
            print(f"[bench] profile of {args.profile_steps} project steps (batch {batch_size}, sorted by self "
                  f"{profile['clock']} time):\n{profile['table']}")

        # ------------------------------------------------------------------------------ 3. evaluation
        evaluation_result, test_figures_result = None, None
        if not args.skip_eval:
            session = LocalSession(project["session_dir"])
            state = session.load_checkpoint()
            model = VAE("conv", IMAGE_SHAPE, REFERENCE_LATENT, REFERENCE_HIDDEN, args.likelihood, args.gaussian_std)
            if state is not None:
                model.load_state_dict(state["model"])
            test_images = np.load(processed / "test_images.npy", mmap_mode="r")
            print(f"[bench] evaluation: K={num_samples} importance-sampled NLL over {args.eval_images} test images "
                  f"(batch {eval_batch} x {chunk_size} samples per decoder pass)")
            meter = OtherLoad()
            evaluation_result = run_evaluation(model, test_images, device, num_samples, chunk_size, eval_batch)
            evaluation_result["other_load"] = meter.stop()
            figures["evaluation"] = evaluation_result
            if not args.no_test_figures:
                test_figures_result = run_test_figures(model, np.array(test_images), device, num_samples, chunk_size,
                                                       eval_batch)
                figures["test_figures"] = test_figures_result
            del model
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()

        # ------------------------------------------------------------------------------ 4. trials
        trials = None
        if args.trials:
            trial_dir = workdir / "trial-data"
            write_arrays(trial_dir, args.processed_dir if real else None,
                         {"train": args.trial_images, "valid": max(16, args.trial_images // 8)}, seed=1)
            threads_each = max(1, args.threads // args.trials) if not on_gpu else max(1, (os.cpu_count() or 1) // args.trials)
            configs = [project_config(base_params, args, device, trial_dir, batch_size=args.trial_batch_size,
                                      epochs=args.trial_epochs, threads=args.threads if not on_gpu else threads_each,
                                      seed=i) for i in range(args.trials)]
            print(f"[bench] trials: 1 alone, then {args.trials} at once (batch {args.trial_batch_size}, "
                  f"{args.trial_epochs} epochs of {args.trial_images} images each)")
            meter = OtherLoad()
            alone = run_trials(1, configs[:1], args.threads, args.strict_imports, workdir, 3600)
            alone["other_load"] = meter.stop()
            shared_configs = [project_config(base_params, args, device, trial_dir, batch_size=args.trial_batch_size,
                                             epochs=args.trial_epochs, threads=threads_each, seed=i)
                              for i in range(args.trials)]
            meter = OtherLoad()
            shared = run_trials(args.trials, shared_configs, threads_each, args.strict_imports, workdir, 3600)
            shared["other_load"] = meter.stop()
            trials = {"alone": alone, "shared": shared, "threads_each": threads_each}
            figures["trials"] = trials
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- table
    busy_end, own_end = cpu_seconds()
    cores = os.cpu_count() or 1
    others = max(0.0, (busy_end - busy_start) - (own_end - own_start)) / (cores * (time.time() - wall_start))
    figures["other_processes_cpu_share"] = others
    figures["load_average_at_start"] = load_start
    load_note = (f"other processes used {100 * others:.0f}% of the {cores} cores during this run (/proc/stat minus "
                 f"this run's own CPU time); 1-min load average {load_start:.1f} at the start"
                 + ("; the CPU was SHARED: figures are depressed and noisy" if others > 0.15 else ""))
    full_test = CELEBA_SPLIT_COUNTS["test"]
    dtype_name = str(train_dtype).replace("torch.", "")
    cores_text = f"{args.threads} threads on {cores} cores"
    rows: list[tuple[str, str, str]] = [("Setup", "", "")]
    rows.append(("device", device.type, f"{name}; torch {torch.__version__}, {args.threads} CPU threads"))
    rows.append(("other load on the machine", f"{100 * others:.0f}%", load_note))
    rows.append(("model", f"{flops['parameters'] / 1e6:.2f} M params",
                 f"conv 32-512, latent 128, likelihood {args.likelihood} (both sides)"))
    rows.append(("project data", "real" if real else "synthetic", data_note))
    if baseline:
        rows.append(("baseline data", "fixture" if figures["baseline_fixture"] else "real", figures["baseline_data"]))
    rows.append(("Device limits (measured in this run)", "", ""))
    rows.append((f"matmul {dtype_name}", si(limits["matmul_train_dtype"], "FLOP/s"),
                 f"{'8192' if on_gpu else '2048'}^2 matmul, the training dtype"))
    if train_dtype != torch.float32:
        rows.append(("matmul float32", si(limits["matmul_fp32"], "FLOP/s"), "the baseline's dtype"))
    rows.append(("copy bandwidth", si(limits["copy"], "B/s"), "device-to-device copy, read + write"))
    if limits["host_to_device"]:
        rows.append(("host-to-device", si(limits["host_to_device"], "B/s"), "pinned, 1 GiB"))
    rows.append(("Model cost", "", ""))
    rows.append(("FLOPs / image, training step", si(flops["train"], "FLOP"), "forward + backward, FlopCounterMode (matmul/conv only)"))
    rows.append(("FLOPs / image, forward", si(flops["forward"], "FLOP"), "encoder + one decode"))
    rows.append(("FLOPs / decode", si(flops["decode"], "FLOP"), "one z -> likelihood parameters (the NLL's unit of work)"))
    rows.append(("memory traffic / image, step", si(traffic, "B"), "eager op-level estimate: each op reads inputs, writes outputs once"))
    rows.append(("Training throughput", "", ""))
    if baseline:
        baseline_flops = flops["train"] * baseline["images_per_s"]
        rows.append(("baseline", rate(baseline["images_per_s"]),
                     f"{baseline['images']} images after {args.baseline_warmup} warm-up batches; "
                     f"{100 * baseline['data_wait_share']:.0f}% waiting for the loader; fp32 eager, batch {args.baseline_batch_size}"
                     + load_text(baseline.get("other_load"))))
        if not on_gpu and baseline["cpu_seconds_per_image"]:
            rows.append(("baseline CPU time / image", f"{1e3 * baseline['cpu_seconds_per_image']:.1f} ms",
                         f"training process + its {args.baseline_workers} loader workers; {cores_text} -> "
                         f"{cores / baseline['cpu_seconds_per_image']:,.0f} img/s if the cores were all ours"))
        rows.append(("baseline achieved", si(baseline_flops, "FLOP/s"),
                     f"{100 * baseline_flops / limits['matmul_fp32']:.1f}% of the fp32 matmul rate"))
        if baseline["peak_gpu_bytes"]:
            rows.append(("baseline peak GPU memory", si(baseline["peak_gpu_bytes"], "B"), "torch.cuda.max_memory_allocated"))
    for run in runs:
        knobs = ", ".join(f"{k}={v}" for k, v in run["train_knobs"].items())
        knobs += "; applied by train_worker: " + ", ".join(f"{k.removesuffix('_applied')}={v}" for k, v in run["applied"].items())
        label = f"project, batch {run['batch_size']}"
        rows.append((f"{label}: train steps", rate(run["train_images_per_s"]),
                     f"train_worker, mean of {run['steady_epochs']} epoch(s) after the first; data gather included; {knobs}"
                     + load_text(run.get("other_load"))))
        rows.append((f"{label}: epoch incl. validation", rate(run["epoch_images_per_s"]),
                     f"{run['epoch_seconds']:.2f} s per epoch of {run['images_per_epoch']} images "
                     f"(validation {run['validation_seconds']:.2f} s of it)"))
        rows.append((f"{label}: wall incl. checkpoint", rate(run["wall_images_per_s"]),
                     f"epoch + pictures + checkpoint; first epoch {run['first_epoch_seconds']:.1f} s, "
                     f"whole train_worker call {run['wall_seconds']:.1f} s"))
        if not on_gpu and run["cpu_seconds_per_image"]:
            rows.append((f"{label}: CPU time / image", f"{1e3 * run['cpu_seconds_per_image']:.1f} ms",
                         f"whole epochs incl. validation, pictures, checkpoint; {cores_text} -> "
                         f"{cores / run['cpu_seconds_per_image']:,.0f} img/s if the cores were all ours"))
        achieved = flops["train"] * run["train_images_per_s"]
        peak_matmul = limits["matmul_train_dtype"]
        rows.append((f"{label}: achieved", si(achieved, "FLOP/s"),
                     f"{100 * achieved / peak_matmul:.1f}% of the {dtype_name} matmul rate measured above"))
        if run is project:
            bandwidth = traffic * run["train_images_per_s"]
            rows.append((f"{label}: memory traffic", si(bandwidth, "B/s"),
                         f"estimate = traffic/image x images/s: {100 * bandwidth / limits['copy']:.0f}% of the copy bandwidth"))
        if run["peak_gpu_bytes"]:
            rows.append((f"{label}: peak GPU memory", si(run["peak_gpu_bytes"], "B"), "torch.cuda.max_memory_allocated, whole run"))
        if on_gpu:
            epoch_time = CELEBA_SPLIT_COUNTS["train"] / run["train_images_per_s"]
            rows.append((f"{label}: CelebA epoch", seconds_text(epoch_time), "162,770 images at the train-step rate"))
    if baseline:
        best = max(runs, key=lambda r: r["train_images_per_s"])
        rows.append(("ratio project / baseline", f"{project['train_images_per_s'] / baseline['images_per_s']:.2f}x",
                     f"train steps, batch {project['batch_size']} (params' batch); epoch incl. validation: "
                     f"{project['epoch_images_per_s'] / baseline['images_per_s']:.2f}x"))
        if not on_gpu and baseline["cpu_seconds_per_image"] and project["cpu_seconds_per_image"]:
            rows.append(("ratio by CPU time / image", f"{baseline['cpu_seconds_per_image'] / project['cpu_seconds_per_image']:.2f}x",
                         "baseline CPU-s per image / project's (less sensitive to other load; OpenMP spin-waits "
                         "still inflate both under contention)"))
        if best is not project:
            rows.append(("ratio, best batch", f"{best['train_images_per_s'] / baseline['images_per_s']:.2f}x",
                         f"train steps, batch {best['batch_size']}"))
    if not on_gpu:
        rows.append(("peak process memory (RSS)", si(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0, "B"),
                     "CPU run: the whole benchmark process, not one phase"))
    if trials:  # a fresh process that ran only train_worker: what the measured path itself imports
        loaded, where = trials["shared"]["forbidden_loaded"], "in a trial process after train_worker"
    else:  # this process also validated params with pipeline.config (pydantic) when it could
        loaded, where = forbidden, "in this process (which also validated params) after train_worker"
    rows.append(("ray/mlflow/dvc/pydantic imported", ", ".join(loaded) or "none",
                 where + (" (blocked: --strict-imports)" if args.strict_imports else "")))
    if evaluation_result:
        rows.append((f"Evaluation: K={num_samples} importance-sampled NLL", "", ""))
        per_image = evaluation_result["seconds"] / evaluation_result["images"]
        extrapolated = evaluation_result["images"] < full_test
        rows.append((f"{evaluation_result['images']} test images", seconds_text(evaluation_result["seconds"]),
                     f"{evaluation_result['decodes_per_s']:,.0f} decodes/s; batch {eval_batch} x {chunk_size} samples per pass"
                     f"{'; bf16 autocast' if on_gpu else '; fp32'}" + load_text(evaluation_result.get("other_load"))))
        rows.append((f"{full_test:,} test images", seconds_text(per_image * full_test),
                     "EXTRAPOLATED linearly from the run above" if extrapolated else "measured"))
        decode_flops = flops["decode"] * evaluation_result["decodes_per_s"]
        rows.append(("evaluation achieved", si(decode_flops, "FLOP/s"),
                     f"{100 * decode_flops / limits['matmul_train_dtype']:.1f}% of the {dtype_name} matmul rate (decoder FLOPs only)"))
        if evaluation_result["peak_gpu_bytes"]:
            rows.append(("evaluation peak GPU memory", si(evaluation_result["peak_gpu_bytes"], "B"), ""))
        if test_figures_result:
            if "error" in test_figures_result:
                rows.append(("pipeline.evaluate.test_figures", "not run", test_figures_result["error"]))
            else:
                rows.append(("pipeline.evaluate.test_figures", seconds_text(test_figures_result["seconds"]),
                             f"the stage's function on the same {test_figures_result['images']} images "
                             f"(adds ELBO, reconstruction, active units); per 19,962: "
                             f"{seconds_text(test_figures_result['seconds'] / test_figures_result['images'] * full_test)}"
                             f"{' (extrapolated)' if extrapolated else ''}"))
    if trials:
        rows.append((f"Trials sharing the {'GPU' if on_gpu else 'CPU'}", "", ""))
        alone, shared = trials["alone"], trials["shared"]
        rows.append(("1 trial alone", rate(alone["aggregate_images_per_s"]),
                     f"train_worker in a spawned process, batch {args.trial_batch_size}, "
                     f"{args.threads if not on_gpu else trials['threads_each']} CPU threads; epochs after the first, "
                     "incl. validation and checkpoints" + load_text(alone.get("other_load"))))
        rows.append((f"{shared['trials']} trials at once, aggregate", rate(shared["aggregate_images_per_s"]),
                     f"{shared['aggregate_images_per_s'] / alone['aggregate_images_per_s']:.2f}x one alone; per trial "
                     + ", ".join(f"{r:,.0f}" for r in shared["per_trial_images_per_s"])
                     + f" img/s; {trials['threads_each']} CPU thread(s) each; windows overlap {100 * shared['overlap']:.0f}%"
                     + load_text(shared.get("other_load"))))
    rows.append(("Targets", "", ""))
    if on_gpu:
        rows.append(("train >= 50,000 img/s", "met" if project["train_images_per_s"] >= 50_000 else "MISSED",
                     rate(project["train_images_per_s"])))
        if baseline:
            ratio = project["train_images_per_s"] / baseline["images_per_s"]
            rows.append((">= 20x baseline", "met" if ratio >= 20 else "MISSED", f"{ratio:.1f}x"))
        if evaluation_result:
            total = evaluation_result["seconds"] / evaluation_result["images"] * full_test
            rows.append(("NLL K=1000 on 19,962 < 120 s", "met" if total < 120 and num_samples >= 1000 else "MISSED",
                         seconds_text(total) + (" (extrapolated)" if evaluation_result["images"] < full_test else "")))
    elif baseline:
        faster = project["train_images_per_s"] > baseline["images_per_s"]
        rows.append(("CPU: project faster than baseline", "met" if faster else "MISSED",
                     f"{project['train_images_per_s'] / baseline['images_per_s']:.2f}x"))
    table = render_table(rows)
    print("\n" + table)
    if profile:
        top = "; ".join(f"{t['op']} {100 * t['share']:.0f}%" for t in profile["top"][:8])
        print(f"\n[bench] top ops (self {profile['clock']} time): {top}")
    figures["rows"] = rows
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    if not args.no_record:
        block = [f"### {when} · {name}", "", f"- command: `{figures['command']}`", f"- commit: {figures['commit']}",
                 f"- torch {torch.__version__}; params: {params_source}", f"- train_worker tracking import: {tracking_note}",
                 "", render_markdown(rows)]
        if profile:
            block += ["", f"Profile of {args.profile_steps} project steps (batch {batch_size}), top ops by self "
                          f"{profile['clock']} time ({profile['wall_ms_per_step']:.0f} ms per step under the profiler):", ""]
            block += [f"- `{t['op']}`: {t['ms_per_step']:.1f} ms/step ({100 * t['share']:.0f}%), "
                      f"{t['calls_per_step']:.0f} calls/step" for t in profile["top"]]
        append_to_section(args.results, SECTION_HEADING, SECTION_INTRO, "\n".join(block))
        print(f"\n[bench] figures added to {args.results} ({SECTION_HEADING} section)")
    return 0


def config_params(base: dict[str, Any], args, device: torch.device, processed: Path, batch: int) -> dict[str, Any]:
    """The params train_worker ran with, for the profile and the traffic count."""
    return project_config(base, args, device, processed, batch_size=batch, epochs=1, threads=args.threads)["params"]


if __name__ == "__main__":
    sys.exit(main())
