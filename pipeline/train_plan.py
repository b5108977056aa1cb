"""What a training run is made of, worked out from the params alone before any worker starts: the model, the
optimiser and the learning-rate schedule, and the batch plan (how the global batch divides among the workers
and how many steps an epoch has). The stages check the batch plan before they start Ray
(:func:`check_batch_fits`); ``pipeline.train_loop`` builds each worker's run from these.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.common import StageError
from pipeline.config import ModelConfig, TrainConfig
from vae.model import VAE


def build_model(model: ModelConfig, image_shape: tuple[int, int, int]) -> VAE:
    """The VAE of params' ``model`` section for images of ``image_shape`` (C, H, W)."""
    return VAE(model.architecture, image_shape, model.latent_dim, model.hidden_dims, model.likelihood,
               model.gaussian_std)


def learning_rate_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the base learning rate: linear warm-up over ``warmup_steps``, then constant or cosine
    decay to 10% of the base rate at ``total_steps`` (Loshchilov & Hutter 2017, without restarts)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, train: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam or AdamW with PyTorch's fused kernel, on GPUs and CPUs alike (on a 2-core CPU the fused AdamW step
    of the MLP VAE takes 0.5 ms, the default multi-tensor one 5.3 ms: benchmarks/RESULTS.md)."""
    cls = torch.optim.AdamW if train.optimizer == "adamw" else torch.optim.Adam
    return cls(model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay, fused=True)


# The images after which torch.compile (inductor) has paid for its compile time on a CPU, by architecture:
# cold-cache compile seconds over the images/s gained, measured on a 2-core CPU at 28x28 (MLP) and 64x64
# (benchmarks/RESULTS.md, "torch.compile against eager", benchmarks/train_throughput.py --parts compile):
# MLP 10.6 s for 1.09x, conv 18.0 s for 1.03x, resnet 26.9 s for 1.05x. On a GPU it is not measured yet
# (benchmarks/gpu_check.sh step 4 measures it), so "auto" stays eager there.
COMPILE_PAYBACK_IMAGES = {"mlp": 1_500_000, "conv": 260_000, "resnet": 120_000}


def should_compile(train: TrainConfig, architecture: str, device: torch.device, epoch_images: int) -> bool:
    """Whether to ``torch.compile`` the model and loss: ``train.compile`` when set to True/False; for "auto",
    True on a CPU when one worker's epoch (``epoch_images`` = steps per epoch x local batch) is at least the
    architecture's :data:`COMPILE_PAYBACK_IMAGES`, so that the compile time is paid back within the first
    epoch (on CelebA's 162,770 training images and one worker: the resnet VAE)."""
    if train.compile != "auto":
        return bool(train.compile)
    payback = COMPILE_PAYBACK_IMAGES.get(architecture)
    return device.type == "cpu" and payback is not None and epoch_images >= payback


def batch_plan(train: TrainConfig, num_train_images: int, world_size: int) -> tuple[int, int]:
    """This rank's batch and the optimisation steps of an epoch when ``world_size`` workers share the training
    split (every epoch drops the last partial global batch; see :func:`pipeline.data.training_indices`).

    Returns:
        (local batch in images = ``train.batch_size // world_size``, steps per epoch, at most
        ``train.max_steps_per_epoch`` when set).
    Raises:
        ValueError: fewer images in ``train.batch_size`` than workers, or a training split smaller than one
            global batch; the message names the setting to change. Deterministic: the train stage checks it
            before Ray starts, so no runner retries it.
    """
    local_batch = train.batch_size // world_size
    if local_batch < 1:
        raise ValueError(
            f"train.batch_size ({train.batch_size}) must be >= the number of workers ({world_size}); raise "
            "train.batch_size or lower train.num_workers"
        )
    steps_per_epoch = num_train_images // (local_batch * world_size)
    if train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, train.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise ValueError(
            f"the training split ({num_train_images} images) is smaller than one batch of "
            f"{local_batch * world_size}; lower train.batch_size"
        )
    return local_batch, steps_per_epoch


def check_batch_fits(train: TrainConfig, processed_dir: Path, world_sizes: Iterable[int]) -> None:
    """:func:`batch_plan` for each of ``world_sizes`` on the preprocessed training split in ``processed_dir``:
    what the stages check before they start Ray, since a setting that cannot work fails the same way on
    every retry.

    Raises:
        StageError: :func:`batch_plan`'s error, for the first world size that does not fit.
    """
    num_train_images = np.load(Path(processed_dir) / "train_images.npy", mmap_mode="r").shape[0]
    for world_size in sorted(set(world_sizes)):
        try:
            batch_plan(train, num_train_images, world_size)
        except ValueError as error:
            raise StageError(f"{error} (nothing was started)") from None
