"""What differs between data-parallel ranks: the device of a rank, sums over the ranks, and each rank's own
random state (the reparameterization, dequantization and binarization noise), saved and restored per rank."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist


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


def all_reduce_sum(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Sum ``values`` over the ranks in place (a no-op for one rank)."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def gather_objects(value: Any, world_size: int) -> list[Any]:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank; ``[value]`` alone."""
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, value)
        return gathered
    return [value]


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of rank ``rank``'s generators: at the start (step 0) and when a resumed run's world size
    differs from its checkpoint's (then per step, so each resumption draws new noise)."""
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def rng_states(device: torch.device, world_size: int) -> dict[str, Any]:
    """Every rank's random state (gathered from all ranks; call it on every rank): {"world_size": W, "ranks":
    [{"torch": CPU state, "cuda": CUDA state (GPU only)} per rank]}."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    states = [state]
    if world_size > 1:
        states = [None] * world_size
        dist.all_gather_object(states, state)
    return {"world_size": world_size, "ranks": states}


def restore_rng_states(saved: dict[str, Any], rank: int, world_size: int, seed: int, step: int,
                       device: torch.device) -> str | None:
    """Set this rank's random state from a checkpoint's :func:`rng_states`. When the world size changed since
    (elastic training), each rank's state is derived afresh from (seed, rank, step) instead,
    deterministically;
    returns a line saying so (None when the saved states were restored)."""
    if saved.get("world_size") != world_size:
        torch.manual_seed(rank_seed(seed, rank, step))
        return (
            f"world size {world_size} differs from the checkpoint's "
            f"{saved.get('world_size')}: per-rank random "
            f"states derived afresh from (train.seed, rank, step {step})"
        )
    state = saved["ranks"][rank]
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    return None
