"""The per-worker training loop: plain PyTorch, readable top to bottom.

Ray Train runs :func:`train_worker` on every worker (``pipeline.ray_runtime`` adapts Ray's context to a
``pipeline.sessions.Session``); tests and benchmarks run it with ``LocalSession``. The loop is three
functions, each one screen: :func:`set_up` (device, data, model, optimiser, resume),
:func:`train_one_epoch` and :func:`end_of_epoch` (validation, tracking, checkpoint).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.common import format_seconds, say
from pipeline.config import Params
from pipeline.data import BatchSource, dataset_folder, evaluation_indices, load_images, training_indices
from pipeline.distributed import (
    all_reduce_sum,
    gather_objects,
    pick_device,
    rank_seed,
    restore_rng_states,
    rng_states,
)
from pipeline.figures import autocast_for, epoch_images, evaluate_elbo
from pipeline.run_logger import RunLogger, start_system_metrics, stop_system_metrics
from pipeline.sessions import LocalSession, NonFiniteLossError, Session, WorkerConfig
from pipeline.step_figures import MAX_STEPS_BETWEEN_READS, EpochTally, StepFigures
from pipeline.tracking import image_grid
from pipeline.train_plan import (
    batch_plan,
    build_model,
    learning_rate_factor,
    make_optimizer,
    should_compile,
)
from vae.model import VAE, ELBOObjective
from vae.objectives import bits_per_dim
from vae.schedules import BetaSchedule, CapacityAnnealing, CyclicalBeta, kl_penalty


# ----------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TrainingRun:
    """Everything one worker's training holds between steps (made by :func:`set_up`)."""

    params: Params
    rank: int
    world_size: int
    device: torch.device
    model: VAE
    objective: nn.Module  # the module that runs forward (DDP / torch.compile wrapped when used)
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    schedule: BetaSchedule
    autocast: Callable[[], AbstractContextManager]
    train_source: BatchSource
    valid_source: BatchSource
    valid_indices: np.ndarray
    local_batch: int
    steps_per_epoch: int
    total_steps: int
    picture_batch: torch.Tensor
    fixed_z: torch.Tensor
    logger: RunLogger
    figures: StepFigures
    parameters: list[nn.Parameter] = field(default_factory=list)  # the model's, listed once (not per step)
    start_epoch: int = 0
    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    steps_at_start: int = 0


# The epoch's figures go to MLflow at the epoch's last step, where a logged step may already have put its own
# beta (of the step trained) and images/s (of its window): the epoch's get names of their own, so every metric
# has one value per step.
EPOCH_METRIC_NAMES = {"beta": "epoch_end_beta", "images_per_s": "epoch_images_per_s"}


def set_up(config: WorkerConfig, session: Session) -> TrainingRun:
    """Device, data, model, optimiser, schedules and tracking for this rank; resumed from the session's
    checkpoint when it has one.

    Raises:
        FileNotFoundError: the preprocessed arrays are missing.
        ValueError: a batch that does not fit the workers or the data.
    """
    params, train = config.params, config.params.train
    rank, world_size = session.world_rank, session.world_size
    device = pick_device(train.use_gpu, session.local_rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(train.cpus_per_worker)))
    torch.manual_seed(train.seed)  # the same initial weights on every rank

    folder = dataset_folder(config.processed_dir, params.cluster.s3_endpoint_url)  # a node-local cache for s3://
    train_images = load_images(folder, "train")
    valid_images = load_images(folder, "valid")
    on_device = device.type == "cuda" and (train.data_on_device == "always" or (
        train.data_on_device == "auto"
        and train_images.nbytes + valid_images.nbytes < 0.4 * torch.cuda.mem_get_info(device)[0]))

    model = build_model(params.model, tuple(int(s) for s in train_images.shape[1:])).to(device)
    if train.channels_last and params.model.architecture != "mlp":  # pays on CPUs too (benchmarks/RESULTS.md)
        model = model.to(memory_format=torch.channels_last)
    local_batch, steps_per_epoch = batch_plan(train, train_images.shape[0], world_size)
    compiled = should_compile(train, params.model.architecture, device, local_batch * steps_per_epoch)
    objective: nn.Module = ELBOObjective(model)
    if compiled:  # static shapes: every training batch has the same size (a ragged end is dropped)
        objective = torch.compile(objective, dynamic=False)
    if world_size > 1:
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    if session.placement is not None:
        places = gather_objects(session.placement, world_size)
        if rank == 0:
            say(f"[train] {world_size} worker(s): " + ", ".join(
                f"rank {r} on {p['node_ip']} (node rank {p['node_rank']})" for r, p in enumerate(places)))
    optimizer = make_optimizer(model, train, device)
    figures = StepFigures(device, min(train.log_every_n_steps, MAX_STEPS_BETWEEN_READS))
    # The fused optimizer reads this flag on the device and skips its update when a step was not finite
    # (as under torch.amp.GradScaler): the check costs the step no host sync.
    optimizer.found_inf = figures.non_finite

    total_steps = train.epochs * steps_per_epoch
    schedule = params.beta_schedule
    if isinstance(schedule, CyclicalBeta):
        schedule = schedule.with_total_steps(total_steps)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, total_steps, train.lr_warmup_steps, train.lr_schedule)
    )

    rows = params.evaluate.num_image_rows
    run = TrainingRun(
        params=params,
        rank=rank,
        world_size=world_size,
        device=device,
        model=model,
        objective=objective,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        schedule=schedule,
        autocast=autocast_for(train.precision, device),
        train_source=BatchSource(train_images, device, on_device),
        valid_source=BatchSource(valid_images, device, on_device),
        valid_indices=evaluation_indices(valid_images.shape[0], rank, world_size),
        local_batch=local_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        picture_batch=torch.from_numpy(np.array(valid_images[: rows * 2])).to(device),
        fixed_z=torch.randn(
            rows * rows, model.latent_dim, generator=torch.Generator().manual_seed(train.seed)
        ).to(device),
        logger=RunLogger(
            config.mlflow_run_id if rank == 0 else None,
            config.tracking_uri or "",
            config.lost_records_path,
            hold_until_commit=True,  # sent once their checkpoint is written: no step logged twice
        ),
        figures=figures,
        parameters=list(model.parameters()),
    )
    torch.manual_seed(rank_seed(train.seed, rank))  # each rank its own noise from here on
    state = session.load_checkpoint()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        run.start_epoch, run.step, run.history = (
            int(state["epoch"]),
            int(state["step"]),
            list(state["history"]),
        )
        note = restore_rng_states(state["rng"], rank, world_size, train.seed, run.step, device)
        run.logger.resend(state.get("mlflow_records", []))  # in case the last attempt died before sending
        if rank == 0:
            say(
                f"[train] resumed from the checkpoint of epoch {run.start_epoch} (step {run.step})"
                + (f"; {note}" if note else "")
            )
    run.steps_at_start = run.step
    return run


def _global_mean(value: torch.Tensor, world_size: int) -> torch.Tensor:
    """The mean of a per-rank scalar over the ranks (no gradient)."""
    if world_size == 1:
        return value.detach()
    return all_reduce_sum(value.detach().clone(), world_size) / world_size


def training_step(run: TrainingRun, x: torch.Tensor) -> torch.Tensor:
    """One optimisation step on this rank's batch x (uint8 (B, C, H, W)): the beta-weighted negative ELBO
    (Kingma & Welling 2014; Higgins et al. 2017), gradients averaged over the ranks (DDP), clipped, then the
    optimiser and learning-rate steps - without waiting for the device (no host sync).

    A non-finite step is caught on the device: when the loss, a term or an (all-reduced) gradient is NaN/inf,
    ``run.figures.non_finite`` is set, and the fused optimizer, which reads it as ``found_inf``, leaves the
    weights and its state as they were, at this step and every later one. The host reads the flag with the
    figures (:func:`train_one_epoch`) and stops the run naming this step. The gradient norm is computed
    where it is used, at logging steps and for clipping; other steps check the gradients in a cheaper pass.

    Returns:
        (4,) float32 tensor on the device: loss, mean reconstruction, mean KL (nats per image), gradient norm
        before clipping (-1: not computed at this step).
    """
    train = run.params.train
    with run.autocast():
        reconstruction, kl_per_dim = run.objective(x, train.num_mc_samples)
    reconstruction, kl = reconstruction.float(), kl_per_dim.float().sum(dim=-1)
    # Capacity annealing's |KL - C| is not linear in the batch: take it on the global batch's mean KL.
    global_kl = (
        _global_mean(kl.mean(), run.world_size) if isinstance(run.schedule, CapacityAnnealing) else None
    )
    loss = reconstruction.mean() + kl_penalty(run.schedule, kl, run.step, batch_mean_kl=global_kl)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    parameters = [p for p in run.parameters if p.grad is not None]
    gradients = [p.grad for p in parameters]
    if train.grad_clip_norm or (run.step + 1) % train.log_every_n_steps == 0:  # the norm where it is used
        grad_norm = torch.nn.utils.get_total_norm(gradients, foreach=True).float()  # NaN/inf: flagged below
        if train.grad_clip_norm:  # scales by min(1, max_norm / norm) on the device: no host comparison
            torch.nn.utils.clip_grads_with_norm_(parameters, train.grad_clip_norm, grad_norm, foreach=True)
        checked: list[torch.Tensor] = []  # the norm, among the figures, is NaN/inf if a gradient is
    else:
        grad_norm, checked = run.figures.not_computed, gradients
    figures = torch.stack([loss.detach(), reconstruction.detach().mean(), kl.detach().mean(), grad_norm])
    # The gradients are the same on every rank (DDP averaged them), the loss is not: the figures checked are
    # summed over the ranks so that every rank skips, and stops at, the same step.
    summed = figures if run.world_size == 1 else all_reduce_sum(figures.clone(), run.world_size)
    run.figures.flag(summed, checked)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.step += 1
    return figures


def train_one_epoch(run: TrainingRun, epoch: int) -> tuple[float, float, float]:
    """One pass over this rank's share of the training split; logs a step line every
    ``train.log_every_n_steps``. The steps run ahead of the host: their figures are read back at logging
    steps, every :data:`pipeline.step_figures.MAX_STEPS_BETWEEN_READS` steps and at the epoch's end.

    Returns:
        The epoch's mean (reconstruction, KL) in nats per image and its images, over all ranks.
    Raises:
        NonFiniteLossError: a step was not finite (the first one is named; the weights are those before it).
    """
    train = run.params.train
    run.model.train()
    tally = EpochTally(run, epoch)
    indices = training_indices(
        run.train_source.num_images, run.local_batch, epoch, train.seed, run.rank, run.world_size
    )
    for x in run.train_source.batches(indices, run.local_batch, run.steps_per_epoch):
        run.figures.record(run.step, training_step(run, x))
        if run.step % train.log_every_n_steps == 0 or run.figures.full:
            tally.add(run.figures.read())
    tally.add(run.figures.read())
    sums = all_reduce_sum(torch.tensor(tally.sums, dtype=torch.float64, device=run.device), run.world_size)
    reconstruction, kl, count = sums.tolist()
    count = max(1.0, count)
    return reconstruction / count, kl / count, count


def end_of_epoch(
    run: TrainingRun,
    session: Session,
    epoch: int,
    train_terms: tuple[float, float, float],
    epoch_seconds: float,
) -> dict[str, float]:
    """Validation, the epoch's metrics and pictures (rank 0 logs them), and the checkpoint, reported through
    the session. Returns the epoch's metrics.

    Raises:
        NonFiniteLossError: a weight or buffer is not finite (nothing is checkpointed).
    """
    params, model = run.params, run.model
    reconstruction, kl, count = train_terms
    validation = evaluate_elbo(
        model, run.valid_source, run.valid_indices, params.evaluate.batch_size, run.world_size, run.autocast
    )
    metrics = {
        "epoch": epoch + 1,
        "step": run.step,
        "beta": run.schedule.beta_at(run.step),
        "train_negative_elbo": reconstruction + kl,
        "train_reconstruction": reconstruction,
        "train_kl": kl,
        "train_bits_per_dim": float(
            bits_per_dim(reconstruction + kl, model.num_dims, model.likelihood.discrete)
        ),
        "val_negative_elbo": validation["negative_elbo"],
        "val_reconstruction": validation["reconstruction"],
        "val_kl": validation["kl"],
        "val_bits_per_dim": validation["bits_per_dim"],
        "epoch_seconds": epoch_seconds,
        "images_per_s": count / epoch_seconds,
    }
    if isinstance(run.schedule, CapacityAnnealing):
        metrics["capacity"] = run.schedule.capacity_at(run.step)
    for name, tensor in model.state_dict().items():  # every rank checks, so every rank stops together
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise NonFiniteLossError(f"epoch {epoch + 1}: {name} is not finite; not checkpointed")
    run.history.append(metrics)
    rng = rng_states(run.device, run.world_size)
    state = None
    if run.rank == 0:
        epochs = params.train.epochs
        logged = {EPOCH_METRIC_NAMES.get(k, k): v for k, v in metrics.items() if k not in ("epoch", "step")}
        run.logger.log_metrics(logged, run.step)
        if (epoch + 1) % params.mlflow.log_images_every_n_epochs == 0 or epoch + 1 == epochs:
            with run.autocast():
                pictures = epoch_images(model, run.picture_batch, run.fixed_z, params.evaluate.num_image_rows)
            for key, images in pictures.items():
                run.logger.log_image(
                    image_grid(images, params.evaluate.num_image_rows), key=key, step=epoch + 1
                )
        eta = (epochs - epoch - 1) * (time.perf_counter() - run.started) / max(1, epoch + 1 - run.start_epoch)
        say(
            f"[train] epoch {epoch + 1}/{epochs} | -ELBO {metrics['train_negative_elbo']:.2f} "
            f"(rec {reconstruction:.2f} + KL {kl:.2f}) | beta {metrics['beta']:.3g} | "
            f"val -ELBO {validation['negative_elbo']:.2f} ({validation['bits_per_dim']:.3f} bits/dim) | "
            f"{metrics['images_per_s']:.0f} img/s | {epoch_seconds:.1f}s | ETA {format_seconds(eta)}"
        )
        state = {
            "model": model.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "lr_scheduler": run.lr_scheduler.state_dict(),
            "epoch": epoch + 1,
            "step": run.step,
            "history": run.history,
            "rng": rng,
            "model_config": model.config,
            "params": params.model_dump(mode="json"),
            "mlflow_records": run.logger.held_records(),
        }
    session.report(metrics, state, epoch + 1)
    run.logger.commit()  # the checkpoint covering them is written: send the epoch's records
    return metrics


def train_worker(config: WorkerConfig, session: Session) -> dict[str, Any]:
    """Train a VAE on this worker's share of the data: the function every Ray Train worker runs.

    Returns:
        {"history": per-epoch metrics, "step": optimisation steps done, "epoch": epochs done}.
    Raises:
        NonFiniteLossError: the loss, the gradient norm or a weight became NaN/inf (names the step and terms).
        FileNotFoundError: the preprocessed arrays are missing.
    """
    run = set_up(config, session)
    epochs = run.params.train.epochs
    several_nodes = session.placement is not None and session.world_size > 1
    monitor = start_system_metrics(  # one per node: its first worker samples the node's CPU, GPU and memory
        config.mlflow_run_id if session.local_rank == 0 else None, config.tracking_uri or "",
        run.params.mlflow.system_metrics_interval_s,
        f"node-{session.placement['node_ip']}" if several_nodes else None)
    try:
        for epoch in range(run.start_epoch, epochs):
            started = time.perf_counter()
            train_terms = train_one_epoch(run, epoch)
            end_of_epoch(run, session, epoch, train_terms, time.perf_counter() - started)
            # A runner may end training at an epoch boundary (Ray Tune's scheduler stopping a trial). Every
            # rank asks and gets the same answer, so all ranks stop after the same epoch.
            if epoch + 1 < epochs and not session.should_continue(epoch + 1):
                if run.rank == 0:
                    say(f"[train] stopped after epoch {epoch + 1}/{epochs} by the runner (early stopping)")
                break
    except NonFiniteLossError:
        run.logger.commit()  # not retried: the steps up to the divergence are what explains it
        raise
    finally:  # flush what was logged so far, also when training stops with an error
        summary = run.logger.close()
        stop_system_metrics(monitor)
    if run.rank == 0 and not summary["sent_all"]:
        say(f"[train] MLflow: {summary['lost_records']} records could not be logged: {summary['errors'][:1]}")
    return {"history": run.history, "step": run.step, "epoch": len(run.history)}


def run_local(
    config: WorkerConfig, directory: Path | str | None = None
) -> tuple[dict[str, Any], LocalSession]:
    """Run :func:`train_worker` in this process with checkpoints in ``directory`` (a temporary folder if
    None)."""
    directory = Path(directory or tempfile.mkdtemp(prefix="vae-train-"))
    session = LocalSession(directory, config.params.train.checkpoint_num_to_keep)
    return train_worker(config, session), session
