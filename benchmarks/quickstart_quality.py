"""Test NLL at the quick start's budget: the pipeline's training loop with params.yaml's defaults against a
plain PyTorch loop of the same model, likelihood and data.

Budget (the quick start's, without its sweep): Fashion-MNIST, MLP VAE 784-512-256-32, discretized logistic
likelihood, batch 128, 10 epochs, linear KL warm-up over 2,000 steps. The plain loop is Adam at lr 1e-3,
constant, no clipping, shuffled batches; the pipeline runs ``train_worker`` with the rest of params.yaml's
``train`` section as it is. Both are scored by the evaluate stage's own code (K = 250 on all 10,000 test
images, the same per-image seeds).

    python benchmarks/quickstart_quality.py [--seeds 0 1] [--no-record]

Needs the preprocessed Fashion-MNIST (``make run`` makes it, or ``dvc repro preprocess`` with
data.dataset=fashion_mnist). Appends the table to the "Quick-start quality" section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from benchmarks.recording import append_to_section, commit, cores, cpu_model  # noqa: E402
from pipeline.data import load_images  # noqa: E402
from pipeline.evaluate import test_figures  # noqa: E402
from pipeline.params_file import load_params  # noqa: E402
from pipeline.sessions import WorkerConfig  # noqa: E402
from pipeline.train_loop import run_local  # noqa: E402
from pipeline.train_plan import build_model  # noqa: E402
from vae.schedules import LinearWarmup  # noqa: E402

BUDGET = {"data.dataset": "fashion_mnist", "model.architecture": "mlp", "model.hidden_dims": [512, 256],
          "model.latent_dim": 32, "model.likelihood": "discretized_logistic",
          "beta_schedule": {"name": "linear", "warmup_steps": 2000}, "train.epochs": 10,
          "train.batch_size": 128, "train.log_every_n_steps": 10_000}


def plain_loop(params, train: np.ndarray, seed: int) -> torch.nn.Module:
    """The loop as tutorials write it: Adam 1e-3, shuffled batches, the -ELBO with a linear KL warm-up."""
    torch.manual_seed(seed)
    model = build_model(params.model, train.shape[1:])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    warmup = LinearWarmup(warmup_steps=2000)
    data = torch.from_numpy(np.array(train))
    step = 0
    for _ in range(params.train.epochs):
        for batch in torch.randperm(len(data)).split(params.train.batch_size):
            terms = model.elbo_terms(data[batch])
            loss = (terms.reconstruction + warmup.beta_at(step) * terms.kl).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    return model.eval()


def pipeline_loop(params, processed: str, seed: int) -> torch.nn.Module:
    """``train_worker`` (through ``run_local``) with params.yaml's training defaults at this budget."""
    params = params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})
    with tempfile.TemporaryDirectory() as folder, contextlib.redirect_stdout(io.StringIO()):
        _, session = run_local(WorkerConfig(params, processed), folder)
        state = session.load_checkpoint()
    model = build_model(params.model, (1, 28, 28))
    model.load_state_dict(state["model"])
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args(argv)
    params = load_params(REPO_ROOT / "params.yaml", BUDGET)
    processed = params.data.processed_path()
    train, test = load_images(processed, "train"), load_images(processed, "test")
    rows = []
    loops = (("plain loop (Adam 1e-3, no clip)", lambda s: plain_loop(params, train, s)),
             ("pipeline, params.yaml defaults", lambda s: pipeline_loop(params, str(processed), s)))
    for seed in args.seeds:
        for name, make in loops:
            start = time.perf_counter()
            model = make(seed)
            seconds = time.perf_counter() - start
            figures = test_figures(model, test, 250, "auto", 128, torch.device("cpu"), seed=0)
            rows.append((name, seed, figures["test_nll"], figures["test_nll_bits_per_dim"],
                         figures["test_negative_elbo"], seconds))
            print(f"{name}, seed {seed}: test NLL {figures['test_nll']:.1f} nats "
                  f"({figures['test_nll_bits_per_dim']:.4f} bits/dim), -ELBO "
                  f"{figures['test_negative_elbo']:.1f}, trained in {seconds:.0f} s", flush=True)
    train_defaults = params.train
    table = ["| loop | seed | test NLL (nats, K=250) | bits/dim | test -ELBO | training s |",
             "|---|---:|---:|---:|---:|---:|"]
    table += [f"| {n} | {s} | {nll:.1f} | {bpd:.4f} | {elbo:.1f} | {sec:.0f} |"
              for n, s, nll, bpd, elbo, sec in rows]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (f"### {when} · {cpu_model()}, {cores()} cores\n\n- command: `python "
              f"benchmarks/quickstart_quality.py {' '.join(sys.argv[1:])}`\n- commit: {commit()}; "
              f"params.yaml train: {train_defaults.optimizer}, lr {train_defaults.learning_rate} "
              f"{train_defaults.lr_schedule} (warm-up {train_defaults.lr_warmup_steps} steps), "
              f"grad_clip_norm {train_defaults.grad_clip_norm}\n")
    block = header + "\n" + "\n".join(table) + "\n"
    print(block)
    if not args.no_record:
        append_to_section("## Quick-start quality", __doc__.split("\n\n")[1], block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
