"""Where a training step's time goes: the project's step against a plain step of the same model and optimizer,
with the loop's own pieces added one at a time, and the pieces timed alone.

    .venv/bin/python benchmarks/step_profile.py                               # MLP 784-512-256-32, Bernoulli
    .venv/bin/python benchmarks/step_profile.py --likelihood discretized_logistic --rounds 9

The ladder (each level adds to the one before; every level runs the same 200 batches, alternated ``--rounds``
times, medians in ms per 128-image step):

- L0 plain: ``model.elbo_terms(x)``, ``reconstruction.mean() + beta * kl.mean()``, zero_grad, backward, fused
  Adam step (the optimizer of ``pipeline.train_plan.make_optimizer``);
- L1 + the loop's objective path: the ``ELBOObjective`` module, the autocast context, ``kl_penalty``;
- L2 + the non-finite check of the gradients and the figures (``StepFigures.flag``);
- L3 + the figures written to the device buffer and read every 50 steps;
- L4 + the learning-rate scheduler: all of ``pipeline.train_loop.training_step``;
- project: ``training_step`` itself with the buffer reads of ``train_one_epoch``.

A table goes to stdout and, with the machine and commit, to the "Step profile" section of
benchmarks/RESULTS.md (unless ``--no-record``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.recording import append_to_section, commit, cores, cpu_model  # noqa: E402
from benchmarks.train_throughput import MNIST_SHAPE, markdown, write_arrays  # noqa: E402
from pipeline.data import training_indices  # noqa: E402
from pipeline.params_file import load_params  # noqa: E402
from pipeline.sessions import LocalSession, WorkerConfig  # noqa: E402
from pipeline.train_loop import TrainingRun, set_up, training_step  # noqa: E402
from vae.schedules import kl_penalty  # noqa: E402

SECTION = "## Step profile"
SECTION_INTRO = "Written by `benchmarks/step_profile.py`: where a training step's time goes."
STEPS = 200


def ladder_step(run: TrainingRun, x: torch.Tensor, level: int) -> None:
    """One step with the loop's pieces up to ``level`` (see the module docstring)."""
    model, optimizer = run.model, run.optimizer
    if level == 0:
        terms = model.elbo_terms(x)
        loss = terms.reconstruction.mean() + run.schedule.beta_at(run.step) * terms.kl.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        run.step += 1
        return
    with run.autocast():
        reconstruction, kl_per_dim = run.objective(x, 1)
    reconstruction, kl = reconstruction.float(), kl_per_dim.float().sum(dim=-1)
    loss = reconstruction.mean() + kl_penalty(run.schedule, kl, run.step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    figures = torch.stack(
        [loss.detach(), reconstruction.detach().mean(), kl.detach().mean(), run.figures.not_computed]
    )
    if level >= 2:
        run.figures.flag(figures, gradients)
    optimizer.step()
    if level >= 4:
        run.lr_scheduler.step()
    if level >= 3:
        run.figures.record(run.step, figures)
        if run.figures.full or (run.step + 1) % 50 == 0:
            run.figures.read()
    run.step += 1


def project_step(run: TrainingRun, x: torch.Tensor) -> None:
    run.figures.record(run.step, training_step(run, x))
    if run.figures.full or run.step % run.params.train.log_every_n_steps == 0:
        run.figures.read()


def time_alone(function, repeats: int = 300) -> float:
    """Milliseconds per call (after a warm-up call)."""
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--likelihood", default="bernoulli")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="step-profile-") as folder:
        source = REPO_ROOT / "data" / "processed" / "fashion_mnist"
        data = write_arrays(Path(folder) / "arrays", MNIST_SHAPE, {"train": 55_000, "valid": 256}, source)
        params = load_params(overrides={
            "data.dataset": "fashion_mnist", "model.architecture": "mlp", "model.hidden_dims": [512, 256],
            "model.latent_dim": 32, "model.likelihood": args.likelihood, "train.batch_size": 128,
            "train.optimizer": "adam", "train.lr_warmup_steps": 0, "train.cpus_per_worker": args.threads,
            "train.log_every_n_steps": 50, "beta_schedule": {"name": "constant", "beta": 1.0},
        })
        run = set_up(WorkerConfig(params, str(Path(folder) / "arrays")), LocalSession(Path(folder) / "ckpt"))
        indices = training_indices(run.train_source.num_images, 128, 0, 0)
        batches = list(run.train_source.batches(indices, 128, STEPS))
        variants = {f"L{level}": (lambda x, level=level: ladder_step(run, x, level)) for level in range(5)}
        variants["project"] = lambda x: project_step(run, x)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.rounds):  # alternated, so the machine's load hits every variant alike
            for name, step in variants.items():
                start = time.perf_counter()
                for x in batches:
                    step(x)
                times[name].append((time.perf_counter() - start) / len(batches) * 1e3)
        medians = {name: median(values) for name, values in times.items()}
        gradients = [p.grad for p in run.model.parameters() if p.grad is not None]
        x = batches[0]
        alone = {
            "gather a batch from the memory-mapped split": time_alone(
                lambda: next(iter(run.train_source.batches(indices, 128, 1)))),
            "gradient norm (foreach; logging steps only)": time_alone(
                lambda: torch.nn.utils.get_total_norm(gradients, foreach=True)),
            "non-finite check of gradients + figures": time_alone(
                lambda: run.figures.flag(torch.zeros(4), gradients)),
            "likelihood target (binarization / scaling)": time_alone(
                lambda: run.model.likelihood.prepare_target(x)),
            "learning-rate scheduler step": time_alone(run.lr_scheduler.step),
        }
    names = {
        "L0": "L0 plain step (same model, fused Adam)", "L1": "L1 + objective module, autocast, kl_penalty",
        "L2": "L2 + non-finite check", "L3": "L3 + figures buffer, read every 50 steps",
        "L4": "L4 + LR scheduler (= training_step)", "project": "training_step as train_one_epoch runs it",
    }
    rows = [(f"**MLP 784-512-256-32, {args.likelihood}, batch 128**", "",
             f"{data}; {STEPS} steps per variant, median of {args.rounds} alternated rounds")]
    rows += [(names[name], f"{value:.3f} ms", f"{medians['L0'] / value:.2f}x the plain step")
             for name, value in medians.items()]
    rows += [(f"alone: {name}", f"{value:.3f} ms", "") for name, value in alone.items()]
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python", "benchmarks/step_profile.py", *map(shlex.quote, sys.argv[1:])])
    block = (f"### {when} · {cpu_model()}, {cores()} cores\n\n- command: `{command}`\n- commit: {commit()}; "
             f"torch {torch.__version__}, {args.threads} CPU thread(s)\n\n{markdown(rows)}\n")
    print(block)
    if not args.no_record:
        append_to_section(SECTION, SECTION_INTRO, block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
