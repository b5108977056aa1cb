"""The training step's figures, kept on the device and read by the host every few steps.

A step that hands its loss to the host (``loss.item()``, ``float(norm)``, ``if not torch.isfinite(...)``)
makes the host wait for the device to finish that step before it can queue the next: on a GPU the launch
queue drains every step. The step here writes its figures into a small device buffer instead, and decides
on the device whether the update may happen (a non-finite flag the fused optimizer honours, as
``torch.amp.GradScaler`` uses it). The host copies the buffer in one transfer at a logging step, when the
buffer is full (:data:`MAX_STEPS_BETWEEN_READS`) and at the epoch's end, and :class:`EpochTally` accounts for
the rows read: the epoch's sums, the logged window, the error naming the first non-finite step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pipeline.common import format_seconds, say
from pipeline.sessions import NonFiniteLossError

if TYPE_CHECKING:
    from pipeline.train_loop import TrainingRun

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


@dataclass
class EpochTally:
    """The host's side of an epoch: the figures read back summed for the epoch and the logging window, logged
    every ``train.log_every_n_steps`` (rank 0), and the first non-finite step turned into the error."""

    run: TrainingRun
    epoch: int
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # reconstruction, KL, images
    window: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])  # loss, rec, KL, grad norm
    window_steps: int = 0
    norms: int = 0  # steps of the window that computed the gradient norm
    window_start: float = field(default_factory=time.perf_counter)

    def add(self, rows: list[tuple[int, list[float]]]) -> None:
        """Account for the steps read from the device; log every ``train.log_every_n_steps``.

        Raises:
            NonFiniteLossError: a row's step was not finite; names the first such step and its terms.
        """
        run, train = self.run, self.run.params.train
        for step, (loss, reconstruction, kl, grad_norm, non_finite) in rows:
            if non_finite:
                raise NonFiniteLossError(
                    f"epoch {self.epoch + 1}, step {step}: loss={loss} "
                    f"grad_norm={'(not computed)' if grad_norm < 0 else grad_norm} "
                    f"reconstruction={reconstruction} kl={kl} beta={run.schedule.beta_at(step):g}. The "
                    "weights were not updated (by this step or any after it) and no checkpoint of this "
                    "state was written. Try a lower train.learning_rate, a train.grad_clip_norm (or a lower "
                    "one), another model.likelihood (a learned Gaussian variance can collapse), or check the "
                    "data."
                )
            figures = (loss, reconstruction, kl, max(grad_norm, 0.0))
            self.window = [total + value for total, value in zip(self.window, figures, strict=True)]
            self.window_steps += 1
            self.norms += grad_norm >= 0
            self.sums = [
                self.sums[0] + reconstruction * run.local_batch,
                self.sums[1] + kl * run.local_batch,
                self.sums[2] + run.local_batch,
            ]
            if (step + 1) % train.log_every_n_steps == 0 and run.rank == 0:
                self._log(step + 1)

    def _log(self, step: int) -> None:
        run, train = self.run, self.run.params.train
        loss, reconstruction, kl = (total / self.window_steps for total in self.window[:3])
        grad_norm = self.window[3] / max(1, self.norms)  # the logged step's (the window's mean if clipping)
        images_per_s = (
            self.window_steps * run.local_batch * run.world_size
            / max(time.perf_counter() - self.window_start, 1e-9)
        )
        beta = run.schedule.beta_at(step - 1)
        run.logger.log_metrics(
            {
                "loss": loss,
                "negative_elbo": reconstruction + kl,
                "reconstruction": reconstruction,
                "kl": kl,
                "beta": beta,
                "learning_rate": run.optimizer.param_groups[0]["lr"],
                "grad_norm": grad_norm,
                "images_per_s": images_per_s,
            },
            step,
        )
        if train.print_steps:
            seconds_per_step = (time.perf_counter() - run.started) / max(1, step - run.steps_at_start)
            eta = (run.total_steps - step) * seconds_per_step
            say(
                f"[train]   step {step}/{run.total_steps} loss {loss:.2f} (rec {reconstruction:.2f} "
                f"+ KL {kl:.2f}) beta {beta:.3g} {images_per_s:.0f} img/s ETA {format_seconds(eta)}"
            )
        self.window = [0.0, 0.0, 0.0, 0.0]
        self.window_steps, self.norms, self.window_start = 0, 0, time.perf_counter()
