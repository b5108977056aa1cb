"""The training step's figures, kept on the device and read by the host every few steps.

A step that hands its loss to the host (``loss.item()``, ``float(norm)``, ``if not torch.isfinite(...)``)
makes the host wait for the device to finish that step before it can queue the next: on a GPU the launch
queue drains every step. The step here writes its figures into a small device buffer instead, and decides
on the device whether the update may happen (a non-finite flag the fused optimizer honours, as
``torch.amp.GradScaler`` uses it). The host copies the buffer in one transfer at a logging step, when the
buffer is full (:data:`MAX_STEPS_BETWEEN_READS`) and at the epoch's end.
"""

from __future__ import annotations

import torch

# The most steps the host lets pass without looking: a divergence is reported at most this many steps after
# it happened (those steps run, but cannot change the weights: see StepFigures.non_finite).
MAX_STEPS_BETWEEN_READS = 100

# The columns of a recorded row.
FIGURE_NAMES = ("loss", "reconstruction", "kl", "grad_norm", "non_finite")


class StepFigures:
    """Per-step figures in a (capacity, 5) float32 buffer on the training device.

    Each row holds one step's loss (the beta-weighted negative ELBO), mean reconstruction term and mean KL
    (nats per image, this rank's batch), the gradient norm before clipping (-1 at a step that did not
    compute it: see pipeline.train_loop.training_step), and the non-finite flag after the step (1.0 from the
    first non-finite step on). ``non_finite`` is the sticky flag itself, a 0-dim
    float32 tensor on the device that the caller registers as the optimizer's ``found_inf``: PyTorch's fused
    Adam/AdamW skip the update (and undo their step count) on the device when it is 1, so no step after a
    divergence changes the weights, although the host learns of it only at the next read.

    Args:
        device: the training device.
        capacity: rows between two reads, 1 <= capacity (callers cap it at :data:`MAX_STEPS_BETWEEN_READS`).
    Raises:
        ValueError: capacity < 1.
    """

    def __init__(self, device: torch.device, capacity: int):
        if capacity < 1:
            raise ValueError(f"StepFigures: capacity must be >= 1, got {capacity}")
        self.rows = torch.zeros(capacity, len(FIGURE_NAMES), dtype=torch.float32, device=device)
        self.non_finite = torch.zeros((), dtype=torch.float32, device=device)
        # the gradient-norm slot of a step that did not compute it
        self.not_computed = torch.full((), -1.0, dtype=torch.float32, device=device)
        self._unit_scale = torch.ones((), dtype=torch.float32, device=device)
        self.count = 0
        self.first_step = 0

    @property
    def full(self) -> bool:
        """Whether the host must read before the next step is recorded."""
        return self.count == self.rows.shape[0]

    def flag(self, figures: torch.Tensor, gradients: list[torch.Tensor] | tuple = ()) -> None:
        """Set the sticky flag when any element of ``figures`` (the step's figures, the same on every rank:
        see pipeline.train_loop.training_step) or of ``gradients`` is NaN or infinite. One pass over them, no
        host sync: GradScaler's own check (``torch._amp_foreach_non_finite_check_and_unscale_``, with a
        scale of 1, which leaves the values as they are), cheaper than a norm of the gradients."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for tensor in (figures, *gradients):
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for tensors in by_dtype.values():
            torch._amp_foreach_non_finite_check_and_unscale_(tensors, self.non_finite, self._unit_scale)

    def record(self, step: int, figures: torch.Tensor) -> None:
        """Store step ``step``'s (4,) figures (loss, reconstruction, KL, gradient norm) with the current flag.

        Raises:
            RuntimeError: the buffer is full (read it first).
        """
        if self.full:
            raise RuntimeError("StepFigures.record: the buffer is full; read() it first")
        if self.count == 0:
            self.first_step = step
        row = self.rows[self.count]
        row[:4].copy_(figures)
        row[4].copy_(self.non_finite)
        self.count += 1

    def read(self) -> list[tuple[int, list[float]]]:
        """The rows recorded since the last read as (step, [loss, reconstruction, kl, grad_norm, non_finite]),
        oldest first, in one device-to-host copy (the only host sync of the steps in between)."""
        values = self.rows[: self.count].tolist()
        first, self.count = self.first_step, 0
        return [(first + offset, row) for offset, row in enumerate(values)]
