"""The per-worker training loop: plain PyTorch, readable top to bottom.

Ray Train runs :func:`train_worker` on every worker (``pipeline.train`` adapts Ray's context to a
:class:`Session`); tests and benchmarks run it directly with :class:`LocalSession`. Nothing here imports ray,
mlflow or dvc at module level, so the loop runs on a machine that has only torch and numpy.

Data path: each rank reads its disjoint share of the uint8 split. On a GPU the whole split is copied to the
device once (``train.data_on_device``) and batches are gathered, shuffled and converted to float there; on a
CPU batches are gathered from the memory-mapped array.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from vae.model import VAE, ELBOObjective
from vae.objectives import bits_per_dim
from vae.schedules import CapacityAnnealing, CyclicalBeta, kl_penalty, make_schedule

CHECKPOINT_FILE = "state.pt"


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; training stops before the weights are touched."""


class Session(Protocol):
    """What the loop needs from its runner (Ray Train or a local folder)."""

    world_rank: int
    world_size: int
    local_rank: int

    def load_checkpoint(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, float], state: dict[str, Any] | None, epoch: int) -> None: ...


def save_state(state: dict[str, Any], directory: Path) -> Path:
    """torch.save ``state`` into ``directory``/state.pt atomically (temporary file, then rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CHECKPOINT_FILE
    tmp = directory / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_state(directory: Path | str) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_state` with ``weights_only=True`` (no pickled code runs)."""
    return torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)


class LocalSession:
    """Runs the loop without Ray: one process, checkpoints in ``directory``/checkpoint_<epoch>/ (the newest
    ``num_to_keep`` kept), reported metrics kept in :attr:`reports`."""

    world_rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, directory: Path | str, num_to_keep: int = 2):
        self.directory = Path(directory)
        self.num_to_keep = num_to_keep
        self.reports: list[dict[str, float]] = []

    def _checkpoints(self) -> list[Path]:
        return sorted(self.directory.glob("checkpoint_*"))

    def load_checkpoint(self) -> dict[str, Any] | None:
        checkpoints = [c for c in self._checkpoints() if (c / CHECKPOINT_FILE).is_file()]
        return load_state(checkpoints[-1]) if checkpoints else None

    def report(self, metrics, state, epoch):
        self.reports.append(dict(metrics))
        if state is not None:
            save_state(state, self.directory / f"checkpoint_{epoch:06d}")
            for old in self._checkpoints()[: -self.num_to_keep]:
                shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def load_images(processed_dir: Path | str, split: str) -> np.ndarray:
    """The memory-mapped uint8 (N, C, H, W) array of a split. Raises FileNotFoundError naming the stage to run."""
    path = Path(processed_dir) / f"{split}_images.npy"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the preprocess stage first (`dvc repro preprocess`)")
    return np.load(path, mmap_mode="r")


def rank_indices(num_images: int, batch_size: int, epoch: int, seed: int, rank: int, world_size: int,
                 shuffle: bool = True) -> torch.Tensor:
    """This rank's image indices for one epoch, in batch order: a seeded permutation of the whole split (the
    same on every rank), split into ``world_size`` disjoint, equally long shares; trimmed to whole batches
    so every rank takes the same number of steps (DDP needs that)."""
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        order = torch.randperm(num_images, generator=generator)
    else:
        order = torch.arange(num_images)
    per_rank = num_images // world_size
    share = order[rank * per_rank:(rank + 1) * per_rank] if shuffle else order[rank:world_size * per_rank:world_size]
    return share[: (per_rank // batch_size) * batch_size] if shuffle else share


class BatchSource:
    """Yields uint8 batches (B, C, H, W) on ``device`` from a uint8 array.

    ``on_device=True`` copies the array to the device once; each batch is then a gather on the device.
    Otherwise each batch is gathered (sorted indices, for locality) from the memory map on the CPU and moved
    with a non-blocking copy from pinned memory when the device is a GPU.
    """

    def __init__(self, images: np.ndarray, device: torch.device, on_device: bool):
        self.num_images = images.shape[0]
        self.device = device
        self.on_device = on_device
        self.host = images
        self.resident = torch.from_numpy(np.ascontiguousarray(images)).to(device) if on_device else None

    def batches(self, indices: torch.Tensor, batch_size: int, max_batches: int | None = None):
        """Full batches in ``indices`` order (at most ``max_batches``); a ragged end is dropped (training)."""
        count = indices.numel() // batch_size
        count = min(count, max_batches) if max_batches else count
        yield from self._gathered(indices, batch_size, count * batch_size)

    def all_batches(self, indices: torch.Tensor, batch_size: int):
        """Every index once, the last batch possibly short (evaluation)."""
        yield from self._gathered(indices, batch_size, indices.numel())

    def _gathered(self, indices: torch.Tensor, batch_size: int, stop: int):
        if self.on_device:
            indices = indices.to(self.device)
        for start in range(0, stop, batch_size):
            chunk = indices[start:start + batch_size]
            if self.resident is not None:
                yield self.resident.index_select(0, chunk)
                continue
            batch = torch.from_numpy(self.host[np.sort(chunk.numpy())])
            if self.device.type == "cuda":
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            yield batch


# ----------------------------------------------------------------------------------------------------------
# Pieces of the loop
# ----------------------------------------------------------------------------------------------------------
def pick_device(use_gpu: bool | str, local_rank: int = 0) -> torch.device:
    """cuda:<local_rank> when GPUs are wanted ("auto": when present), else the CPU.

    Raises:
        RuntimeError: use_gpu is true but torch sees no GPU.
    """
    if use_gpu is True or (use_gpu == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.use_gpu is true but no CUDA GPU is visible to this worker; "
                               "set train.use_gpu: auto or false to train on CPUs")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def build_model(params: dict[str, Any], image_shape: tuple[int, int, int]) -> VAE:
    """The VAE described by params' ``model`` section for images of ``image_shape`` (C, H, W)."""
    m = params["model"]
    return VAE(m["architecture"], image_shape, m["latent_dim"], m["hidden_dims"], m["likelihood"], m["gaussian_std"])


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warm-up over ``warmup_steps``, then constant or cosine
    decay to 10% of the base rate at ``total_steps`` (Loshchilov & Hutter 2017, without restarts)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, train: dict[str, Any], device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW; the fused CUDA kernel on GPUs."""
    cls = torch.optim.AdamW if train["optimizer"] == "adamw" else torch.optim.Adam
    kwargs: dict[str, Any] = {"lr": train["learning_rate"], "weight_decay": train["weight_decay"]}
    if device.type == "cuda":
        kwargs["fused"] = True
    return cls(model.parameters(), **kwargs)


def use_bf16(precision: str, device: torch.device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def _all_reduce_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


@torch.no_grad()
def evaluate_elbo(model: VAE, source: BatchSource, indices: torch.Tensor, batch_size: int, world_size: int,
                  autocast, seed: int = 1234) -> dict[str, float]:
    """Mean negative ELBO, reconstruction and KL (nats per image) and ELBO bits/dim over ``indices``, summed
    across ranks. The likelihood's noise (dequantization / binarization) is seeded, so epochs compare."""
    was_training = model.training
    model.eval()
    device = source.device
    generator = torch.Generator(device=device).manual_seed(seed)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x in source.all_batches(indices, batch_size):
        target = model.likelihood.prepare_target(x, generator)
        with autocast():
            terms = model.elbo_terms(x, 1, generator=generator, target=target)
        sums[0] += terms.reconstruction.double().sum()
        sums[1] += terms.kl.double().sum()
        sums[2] += x.shape[0]
    sums = _all_reduce_sum(sums, world_size)
    model.train(was_training)
    count = max(1.0, float(sums[2]))
    reconstruction, kl = float(sums[0]) / count, float(sums[1]) / count
    negative_elbo = reconstruction + kl
    return {"negative_elbo": negative_elbo, "reconstruction": reconstruction, "kl": kl,
            "bits_per_dim": float(bits_per_dim(negative_elbo, model.num_dims, model.likelihood.discrete))}


@torch.no_grad()
def epoch_images(model: VAE, validation: torch.Tensor, fixed_z: torch.Tensor, rows: int) -> dict[str, np.ndarray]:
    """Pictures for the tracking UI: prior samples (fixed z), validation originals over reconstructions, and
    traversals of the latent dimensions with the largest posterior-mean variance. Float (N, C, H, W) in [0, 1]."""
    was_training = model.training
    model.eval()
    samples = model.likelihood.mean(model.decode(fixed_z))
    originals = validation.float() / 255.0
    reconstructions = model(validation)
    pairs = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)
    means = model.encode(validation).mean
    top = torch.argsort(means.var(dim=0), descending=True)[: min(rows, model.latent_dim)]
    values = torch.linspace(-3, 3, rows, device=fixed_z.device)
    codes = means[0].repeat(top.numel(), rows, 1)
    for row, dim in enumerate(top.tolist()):
        codes[row, :, dim] = values
    traversal = model.likelihood.mean(model.decode(codes.flatten(0, 1)))
    model.train(was_training)
    return {"samples": samples.cpu().numpy(), "reconstructions": pairs.cpu().numpy(), "traversals": traversal.cpu().numpy()}


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def say(message: str) -> None:
    """One progress line on stdout. (Ray Train patches ``print`` into its logger and also tees it, which
    doubles every line; writing to the stream directly gives each line once.)"""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _format_seconds(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


@dataclass
class _Window:
    """Sums of step metrics between two log points, kept on the device (no per-metric host syncs)."""

    sums: torch.Tensor
    count: int = 0
    images: int = 0
    start: float = 0.0


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
def train_worker(config: dict[str, Any], session: Session) -> dict[str, Any]:
    """Train a VAE on this worker's share of the data; the function Ray Train runs on each worker.

    Args:
        config: {"params": the validated params as a plain dict (``Params.model_dump(mode="json")``),
            "processed_dir": absolute path of the preprocessed arrays, "mlflow": {"run_id", "tracking_uri"}
            or None, "lost_records_path": where unsent MLflow records go, "fault_injection": test hooks
            ({"nan_at_step": int} makes that step's loss NaN; {"exit_after_epoch": int} ends the worker process
            the moment that epoch's checkpoint is reported, in a run that did not resume), "record_indices_dir": test hook, each rank saves
            the image indices it trains on per epoch}.
        session: the runner (Ray Train adapter or :class:`LocalSession`).
    Returns:
        {"history": per-epoch metrics, "step": optimisation steps done, "epoch": epochs done}.
    Raises:
        NonFiniteLossError: the loss or gradient norm became NaN/inf (names the step and the terms).
        FileNotFoundError: the preprocessed arrays are missing.
    """
    params = config["params"]
    train = params["train"]
    rank, world_size = session.world_rank, session.world_size
    device = pick_device(train["use_gpu"], session.local_rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(train["cpus_per_worker"])))
    torch.manual_seed(train["seed"] * 1000 + rank)  # reparameterization noise differs across ranks

    train_images = load_images(config["processed_dir"], "train")
    valid_images = load_images(config["processed_dir"], "valid")
    image_shape = tuple(int(s) for s in train_images.shape[1:])
    on_device = device.type == "cuda" and (train["data_on_device"] == "always" or (
        train["data_on_device"] == "auto" and train_images.nbytes + valid_images.nbytes < 0.4 * torch.cuda.mem_get_info(device)[0]))
    train_source = BatchSource(train_images, device, on_device)
    valid_source = BatchSource(valid_images, device, on_device)

    model = build_model(params, image_shape).to(device)
    if train["channels_last"] and model.config["architecture"] != "mlp":  # pays on CPUs too (benchmarks/RESULTS.md)
        model = model.to(memory_format=torch.channels_last)
    objective: nn.Module = ELBOObjective(model)
    if train["compile"]:
        objective = torch.compile(objective)
    if world_size > 1:
        objective = nn.parallel.DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = make_optimizer(model, train, device)

    local_batch = train["batch_size"] // world_size
    if local_batch < 1:
        raise ValueError(f"train.batch_size ({train['batch_size']}) must be >= train.num_workers ({world_size})")
    per_rank = train_images.shape[0] // world_size
    steps_per_epoch = per_rank // local_batch
    if train["max_steps_per_epoch"]:
        steps_per_epoch = min(steps_per_epoch, train["max_steps_per_epoch"])
    if steps_per_epoch < 1:
        raise ValueError(f"the training split ({train_images.shape[0]} images) is smaller than one batch of "
                         f"{local_batch} per worker; lower train.batch_size")
    total_steps = train["epochs"] * steps_per_epoch
    schedule = make_schedule(params["beta_schedule"])
    if isinstance(schedule, CyclicalBeta):
        schedule = schedule.with_total_steps(total_steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, total_steps, train["lr_warmup_steps"], train["lr_schedule"]))

    start_epoch, step, history = 0, 0, []
    state = session.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        start_epoch, step, history = int(state["epoch"]), int(state["step"]), list(state["history"])
        _set_rng_state(state["rng"], device)
        if rank == 0:
            say(f"[train] resumed from the checkpoint of epoch {start_epoch} (step {step})")

    from pipeline.tracking import RunLogger  # numpy + stdlib; mlflow is imported only when a run is given

    mlflow_info = config.get("mlflow") or {}
    logger = RunLogger(mlflow_info.get("run_id") if rank == 0 else None, mlflow_info.get("tracking_uri", ""),
                       Path(config["lost_records_path"]) if config.get("lost_records_path") else None)
    bf16 = use_bf16(train["precision"], device)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()

    faults = config.get("fault_injection") or {}
    nan_at_step = faults.get("nan_at_step")
    exit_after_epoch = faults.get("exit_after_epoch") if state is None else None
    rows = params["mlflow"]["log_images_every_n_epochs"] and params["evaluate"]["num_image_rows"]
    fixed_z = torch.randn(rows * rows, model.latent_dim, generator=torch.Generator().manual_seed(train["seed"])).to(device)
    valid_indices = rank_indices(valid_images.shape[0], 1, 0, 0, rank, world_size, shuffle=False)
    picture_batch = torch.from_numpy(np.array(valid_images[: rows * 2])).to(device)
    clip = train["grad_clip_norm"] or float("inf")
    log_every = train["log_every_n_steps"]
    run_start, steps_at_start = time.perf_counter(), step

    try:
        for epoch in range(start_epoch, train["epochs"]):
            model.train()
            epoch_start = time.perf_counter()
            window = _Window(torch.zeros(4, dtype=torch.float64, device=device), start=time.perf_counter())
            epoch_sums = torch.zeros(3, dtype=torch.float64, device=device)
            indices = rank_indices(train_images.shape[0], local_batch, epoch, train["seed"], rank, world_size)
            if config.get("record_indices_dir"):  # test hook: which images this rank trains on
                Path(config["record_indices_dir"]).mkdir(parents=True, exist_ok=True)
                np.save(Path(config["record_indices_dir"]) / f"rank{rank}_epoch{epoch}.npy", indices[: steps_per_epoch * local_batch].numpy())
            for x in train_source.batches(indices, local_batch, steps_per_epoch):
                with autocast():
                    reconstruction, kl_per_dim = objective(x, train["num_mc_samples"])
                reconstruction, kl = reconstruction.float(), kl_per_dim.float().sum(dim=-1)
                beta = schedule.beta_at(step)
                loss = reconstruction.mean() + kl_penalty(schedule, kl, step)
                if nan_at_step is not None and step == nan_at_step:
                    loss = loss * float("nan")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                # Gradients are all-reduced, so every rank sees the same non-finite norm and stops at the same step.
                # One host sync per step for both checks (the optimizer must not step on non-finite gradients).
                if not bool(torch.isfinite(torch.stack([loss.detach().float(), grad_norm.float()])).all()):
                    raise NonFiniteLossError(
                        f"step {step} (epoch {epoch}): loss={loss.item()} grad_norm={grad_norm.item()} "
                        f"reconstruction={reconstruction.mean().item()} kl={kl.mean().item()} beta={beta}. "
                        "The weights were not updated and no checkpoint of this state was written; lower "
                        "train.learning_rate, set train.grad_clip_norm, or check the data.")
                optimizer.step()
                lr_scheduler.step()
                step += 1
                batch_size = x.shape[0]
                window.sums += torch.stack([loss.detach(), reconstruction.detach().mean(), kl.detach().mean(), grad_norm.detach()]).double()
                epoch_sums[0] += reconstruction.detach().double().sum()
                epoch_sums[1] += kl.detach().double().sum()
                epoch_sums[2] += batch_size
                window.count += 1
                window.images += batch_size * world_size
                if step % log_every == 0 and rank == 0:
                    means = (window.sums / window.count).tolist()
                    elapsed = time.perf_counter() - window.start
                    metrics = {"loss": means[0], "negative_elbo": means[1] + means[2], "reconstruction": means[1], "kl": means[2],
                               "beta": beta, "learning_rate": optimizer.param_groups[0]["lr"], "grad_norm": means[3],
                               "images_per_s": window.images / max(elapsed, 1e-9)}
                    logger.log_metrics(metrics, step)
                    done = step - steps_at_start
                    eta = (total_steps - step) * (time.perf_counter() - run_start) / max(1, done)
                    say(f"[train]   step {step}/{total_steps} loss {means[0]:.2f} (rec {means[1]:.2f} + KL {means[2]:.2f}) "
                          f"beta {beta:.3g} {metrics['images_per_s']:.0f} img/s ETA {_format_seconds(eta)}")
                    window = _Window(torch.zeros_like(window.sums), start=time.perf_counter())

            epoch_sums = _all_reduce_sum(epoch_sums, world_size)
            count = max(1.0, float(epoch_sums[2]))
            train_reconstruction, train_kl = float(epoch_sums[0]) / count, float(epoch_sums[1]) / count
            validation = evaluate_elbo(model, valid_source, valid_indices, params["evaluate"]["batch_size"], world_size, autocast)
            epoch_seconds = time.perf_counter() - epoch_start
            metrics = {
                "epoch": epoch + 1, "step": step, "beta": schedule.beta_at(step),
                "train_negative_elbo": train_reconstruction + train_kl, "train_reconstruction": train_reconstruction, "train_kl": train_kl,
                "train_bits_per_dim": float(bits_per_dim(train_reconstruction + train_kl, model.num_dims, model.likelihood.discrete)),
                "val_negative_elbo": validation["negative_elbo"], "val_reconstruction": validation["reconstruction"],
                "val_kl": validation["kl"], "val_bits_per_dim": validation["bits_per_dim"],
                "epoch_seconds": epoch_seconds, "images_per_s": count / epoch_seconds,
            }
            if isinstance(schedule, CapacityAnnealing):
                metrics["capacity"] = schedule.capacity_at(step)
            history.append(metrics)
            new_state = None
            if rank == 0:
                logger.log_metrics({k: v for k, v in metrics.items() if k not in ("epoch", "step")}, step)
                if (epoch + 1) % params["mlflow"]["log_images_every_n_epochs"] == 0 or epoch + 1 == train["epochs"]:
                    from pipeline.tracking import image_grid

                    with autocast():
                        pictures = epoch_images(model, picture_batch, fixed_z, rows)
                    for key, images in pictures.items():
                        logger.log_image(image_grid(images, rows), key=key, step=epoch + 1)
                eta = (train["epochs"] - epoch - 1) * (time.perf_counter() - run_start) / max(1, epoch + 1 - start_epoch)
                say(f"[train] epoch {epoch + 1}/{train['epochs']} | -ELBO {metrics['train_negative_elbo']:.2f} "
                      f"(rec {train_reconstruction:.2f} + KL {train_kl:.2f}) | beta {metrics['beta']:.3g} | "
                      f"val -ELBO {validation['negative_elbo']:.2f} ({validation['bits_per_dim']:.3f} bits/dim) | "
                      f"{metrics['images_per_s']:.0f} img/s | {epoch_seconds:.1f}s | ETA {_format_seconds(eta)}")
                for name, tensor in model.state_dict().items():
                    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                        raise NonFiniteLossError(f"epoch {epoch + 1}: parameter {name} is not finite; not checkpointed")
                new_state = {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "epoch": epoch + 1, "step": step, "history": history, "rng": _rng_state(device),
                    "model_config": json.dumps(model.config), "params": json.dumps(params),
                }
                logger.drain(timeout_s=2.0)  # the epoch's records leave before its checkpoint (a slow server: at most 2 s)
            session.report(metrics, new_state, epoch + 1)
            if exit_after_epoch == epoch + 1:
                os._exit(1)  # a crash between the checkpoint write and anything after it
            # A runner may end training at an epoch boundary (Ray Tune's scheduler stopping a trial: see
            # pipeline.tune). Every rank asks and gets the same answer, so all ranks stop after the same epoch.
            if epoch + 1 < train["epochs"] and not getattr(session, "should_continue", lambda epoch: True)(epoch + 1):
                if rank == 0:
                    say(f"[train] stopped after epoch {epoch + 1}/{train['epochs']} by the runner (early stopping)")
                break

    finally:  # flush what was logged so far, also when training stops with an error
        summary = logger.close()
    if rank == 0 and not summary["sent_all"]:
        say(f"[train] MLflow: {summary['lost_records']} records could not be logged: {summary['errors'][:1]}")
    return {"history": history, "step": step, "epoch": len(history)}


def run_local(config: dict[str, Any], directory: Path | str | None = None) -> tuple[dict[str, Any], LocalSession]:
    """Run :func:`train_worker` in this process with checkpoints in ``directory`` (a temporary folder if None)."""
    directory = Path(directory or tempfile.mkdtemp(prefix="vae-train-"))
    session = LocalSession(directory, config["params"]["train"]["checkpoint_num_to_keep"])
    return train_worker(config, session), session
