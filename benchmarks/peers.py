"""The project's training loop side by side with its peers: a plain PyTorch loop and pythae 0.1.2's
``TrainingPipeline``, on the same model, the same data and the same optimizer, in one run.

    .venv/bin/pip install -e '.[bench]'         # pythae 0.1.2 (optional)
    .venv/bin/python benchmarks/peers.py        # 55,000 images per MLP run, 2,048 conv, 3 rounds
    .venv/bin/python benchmarks/peers.py --models mlp_bernoulli,mlp_logistic --repeats 5
    .venv/bin/python benchmarks/peers.py --images 2048 --repeats 1 --no-record      # a quick check

What it measures: training images per second of one epoch (batch 128 for the MLPs, 64 for the conv VAE, Adam
at lr 1e-3, beta = 1), for each model:

- ``project``: ``pipeline.train_loop.train_worker`` on a ``LocalSession`` (through
  ``benchmarks.train_throughput.run_worker``), params.yaml's settings except the model, the batch, one epoch,
  ``train.optimizer: adam`` (the project's fused Adam), no learning-rate warm-up and ``beta_schedule:
  constant`` at 1; ``train.log_every_n_steps`` stays at params.yaml's 50 (what a user runs). Its figure is the
  epoch's own ``images_per_s``: the training steps with the data gather, the gradient norm, the NaN check
  (on the device, read by the host at logging steps), the LR scheduler and the step logging; validation,
  pictures and the checkpoint excluded.
- ``plain``: a plain PyTorch loop on the same ``vae.model.VAE`` (``model.elbo_terms(x)``: the same likelihood
  and uint8 input conversion), a ``torch.randperm`` order, uint8 batches gathered from an in-memory tensor,
  ``reconstruction.mean() + beta * kl.mean()``, zero_grad/backward/step; once with ``torch.optim.Adam``'s
  default (multi-tensor "foreach") step and once with ``fused=True`` (the project's).
- ``pythae``: pythae 0.1.2's ``TrainingPipeline`` with a ``pythae.models.VAE`` whose ``BaseEncoder`` /
  ``BaseDecoder`` wrap the very networks of the project's model (``vae.networks``: Flatten -> Linear 784-512
  -> ReLU -> Linear 512-256 -> ReLU -> Linear 256-64 and the mirrored decoder for the MLP; the conv VAE's
  blocks), data as float32 in [0, 1] (pythae's convention), one epoch, no eval data,
  ``train_dataloader_num_workers=0``, default Adam and ``optimizer_params={"fused": True}``. Bernoulli:
  ``reconstruction_loss="bce"`` (a sigmoid on the decoder output, BCE on the grey levels). Discretized
  logistic: a ``pythae.models.VAE`` subclass whose ``loss_function`` is the project's
  ``vae.likelihoods.DiscretizedLogistic().log_prob`` on the 8-bit values (the decoder outputs 2 channels:
  mean and log scale), so pythae runs the same likelihood.

Fairness notes:

- Every side trains the same architecture from the same seed with the same batch, learning rate, beta and Adam
  update, in the same process, with ``torch.set_num_threads(--threads)`` (all cores by default). The sides
  are alternated (project, plain, plain fused, pythae, pythae fused; again ``--repeats`` times) so that a
  change of the machine's load hits every side alike; medians and ranges are reported. Before the first
  round three batches of the plain loop and of pythae, with each optimizer, warm up each model's kernels,
  allocator and first-call costs (not counted).
- Each side times only its training steps. pythae: a ``TrainingCallback`` starts the clock at
  ``on_train_step_begin`` (the start of pythae's epoch loop) and stops it at the last ``on_train_step_end``
  (after the last optimizer step), so the timing includes pythae's ``DataLoader`` (a per-image
  ``__getitem__`` and ``default_collate``), its per-step ``loss.item()`` and NaN check and its progress bar
  (tqdm, written to /dev/null), and excludes pythae's data checks, model sanity check, output folder,
  best-model ``deepcopy`` and model saving (its ``output_dir`` is a temporary folder). The images counted are
  those trained: pythae keeps the last partial batch, the project and the plain loop drop it.
- Likelihood differences that cost little: the project's Bernoulli binarizes each batch (u < x with
  uniform bytes u, as the plain loop through the same model) and takes BCE with logits, pythae's "bce" takes
  BCE of sigmoid outputs against the grey levels; the project's encoder sees x / 127.5 - 1, pythae's wrapper
  maps [0, 1] to [-1, 1] alike. The project's conv model is ``channels_last`` (its default); the plain loop
  and pythae are not.
- CPU only: pythae runs with ``no_cuda=True``, the project with ``use_gpu: false``.

Data: the real Fashion-MNIST training images (data/processed/fashion_mnist when preprocessed, else Debian's
``dataset-fashion-mnist`` files named by params.yaml's ``download.fashion_mnist_local_dir``, else synthetic
uint8 pixels); the conv VAE gets CelebA-64 arrays when preprocessed, else synthetic pixels. The run says
which.

A table goes to stdout; with command, machine, versions, commit and load, it is appended to the "Peers"
section of benchmarks/RESULTS.md (unless ``--no-record``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.recording import RESULTS_PATH, append_to_section, commit, cores, cpu_model  # noqa: E402
from benchmarks.train_throughput import markdown, other_load, run_worker, write_arrays  # noqa: E402
from pipeline import datasets as ds  # noqa: E402
from pipeline.config import Params  # noqa: E402
from pipeline.params_file import load_params  # noqa: E402
from vae.likelihoods import DiscretizedLogistic  # noqa: E402
from vae.model import VAE  # noqa: E402
from vae.schedules import ConstantBeta  # noqa: E402

SECTION = "## Peers"
SECTION_INTRO = (
    "Written by `benchmarks/peers.py` (one block per run, newest last): images/s of one training epoch of "
    "the project's `train_worker` against a plain PyTorch loop and pythae 0.1.2's `TrainingPipeline`, on the "
    "same model, data and Adam (batch 128 MLP / 64 conv, lr 1e-3, beta 1), sides alternated, medians. "
    "Fairness notes: every side times its training steps only (the project: its epoch's `images_per_s`, "
    "step logging every 50 steps included, validation excluded; pythae: a `TrainingCallback` from its "
    "epoch loop's start to the last optimizer step, its DataLoader, per-step `loss.item()` and progress bar "
    "included, its data checks, sanity check, best-model copy and saving excluded); pythae's discretized "
    "logistic is the project's `DiscretizedLogistic().log_prob` in an overridden `loss_function`; pythae's "
    "Bernoulli is its `bce` on grey levels (the project binarizes); see the module docstring."
)
PYTHAE_VERSION = "0.1.2"
INSTALL_HINT = "pythae is not installed: `.venv/bin/pip install -e '.[bench]'`"
LEARNING_RATE = 1e-3
BETA = 1.0
MNIST_SHAPE = (1, 28, 28)
CELEBA_SHAPE = (3, 64, 64)
MODELS: dict[str, dict[str, Any]] = {
    "mlp_bernoulli": {
        "title": "MLP 784-512-256-32, Bernoulli",
        "architecture": "mlp", "shape": MNIST_SHAPE, "latent_dim": 32, "hidden_dims": [512, 256],
        "likelihood": "bernoulli", "batch": 128, "images": 55_000, "valid": 1000,
        "sides": ["project", "plain", "plain_fused", "pythae", "pythae_fused"],
    },
    "mlp_logistic": {
        "title": "MLP 784-512-256-32, discretized logistic",
        "architecture": "mlp", "shape": MNIST_SHAPE, "latent_dim": 32, "hidden_dims": [512, 256],
        "likelihood": "discretized_logistic", "batch": 128, "images": 55_000, "valid": 1000,
        "sides": ["project", "plain", "plain_fused", "pythae", "pythae_fused"],
    },
    "conv": {
        "title": "reference conv VAE 32-512, latent 128, discretized logistic (CelebA-64 shape)",
        "architecture": "conv", "shape": CELEBA_SHAPE, "latent_dim": 128,
        "hidden_dims": [32, 64, 128, 256, 512],
        "likelihood": "discretized_logistic", "batch": 64, "images": 2048, "valid": 256,
        "sides": ["project", "plain_fused", "pythae_fused"],
    },
}
SIDE_NAMES = {
    "project": "project train_worker (fused Adam, log every 50 steps)",
    "plain": "plain loop, torch.optim.Adam (foreach)",
    "plain_fused": "plain loop, torch.optim.Adam(fused=True)",
    "pythae": "pythae TrainingPipeline, Adam (foreach)",
    "pythae_fused": "pythae TrainingPipeline, Adam(fused=True)",
}


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------
def fashion_mnist_source(base: Params, workdir: Path) -> tuple[Path | None, str]:
    """(folder with ``train_images.npy`` / ``valid_images.npy``, what it is): the preprocessed arrays, else
    Debian's IDX files split as the preprocess stage does (first 55,000 / last 5,000), else None."""
    processed = REPO_ROOT / "data" / "processed" / "fashion_mnist"
    if all((processed / f"{split}_images.npy").is_file() for split in ("train", "valid")):
        return processed, f"real Fashion-MNIST from {processed}"
    debian = base.download.fashion_mnist_local_dir
    if debian is not None and (Path(debian) / ds.MNIST_TRAIN_IMAGES).is_file():
        from pipeline.preprocess import read_idx

        images = read_idx(Path(debian) / ds.MNIST_TRAIN_IMAGES)[:, None, :, :]
        folder = workdir / "fashion_mnist_idx"
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "train_images.npy", images[: ds.MNIST_TRAIN_COUNT])
        np.save(folder / "valid_images.npy", images[ds.MNIST_TRAIN_COUNT :])
        return folder, f"real Fashion-MNIST from Debian's files in {debian}"
    return None, ""


def prepare_data(
    name: str, spec: dict[str, Any], count: int, base: Params, workdir: Path
) -> tuple[Path, str]:
    """The processed folder of ``name`` (``count`` training images) and a description of its pixels."""
    folder = workdir / name
    if spec["shape"] == MNIST_SHAPE:
        source, real = fashion_mnist_source(base, workdir)
    else:
        source, real = REPO_ROOT / "data" / "processed" / "celeba", "real CelebA-64 arrays"
    data = write_arrays(folder, spec["shape"], {"train": count, "valid": spec["valid"]}, source)
    return folder, (real if data.startswith("real") else data)


# ----------------------------------------------------------------------------------------------------------
# The sides
# ----------------------------------------------------------------------------------------------------------
def build_model(spec: dict[str, Any]) -> VAE:
    torch.manual_seed(0)  # every side starts from the same weights
    return VAE(
        spec["architecture"], spec["shape"], spec["latent_dim"], spec["hidden_dims"], spec["likelihood"]
    )


def project_params(base: Params, spec: dict[str, Any], threads: int) -> Params:
    """params.yaml's settings with this model, batch, one epoch, the project's fused Adam at a constant lr and
    beta = 1. ``log_every_n_steps`` stays at params.yaml's value (50): what a user runs."""
    return base.model_copy(
        update={
            "model": base.model.model_copy(
                update={
                    "architecture": spec["architecture"],
                    "latent_dim": spec["latent_dim"],
                    "hidden_dims": spec["hidden_dims"],
                    "likelihood": spec["likelihood"],
                }
            ),
            "train": base.train.model_copy(
                update={
                    "batch_size": spec["batch"],
                    "epochs": 1,
                    "optimizer": "adam",
                    "learning_rate": LEARNING_RATE,
                    "weight_decay": 0.0,
                    "lr_schedule": "constant",
                    "lr_warmup_steps": 0,
                    "grad_clip_norm": None,
                    "num_mc_samples": 1,
                    "cpus_per_worker": threads,
                    "use_gpu": False,
                    "compile": False,
                    "max_steps_per_epoch": None,
                }
            ),
            "beta_schedule": ConstantBeta(beta=BETA),
        }
    )


def plain_epoch(spec: dict[str, Any], data: torch.Tensor, fused: bool, max_steps: int | None = None) -> float:
    """One epoch of a plain PyTorch loop over the uint8 tensor ``data``; returns images/s."""
    model = build_model(spec)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, fused=True if fused else None)
    batch = spec["batch"]
    steps = len(data) // batch if max_steps is None else min(max_steps, len(data) // batch)
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(data))
    for step in range(steps):
        x = data[order[step * batch : (step + 1) * batch]]
        terms = model.elbo_terms(x)
        loss = terms.reconstruction.mean() + BETA * terms.kl.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def load_pythae() -> dict[str, Any] | None:
    """pythae's classes, or None when it is not installed. pythae 0.1.2 imports as it is with torch 2.14,
    numpy 2 and pydantic 2 (its ``dataclasses`` backport dependency is shadowed by the standard library's),
    so no workaround is needed; its loggers and tqdm bars are silenced in :func:`pythae_epoch`."""
    try:
        import pythae
        from pythae.models import VAE as PythaeVAE
        from pythae.models import VAEConfig
        from pythae.models.base.base_utils import ModelOutput
        from pythae.models.nn import BaseDecoder, BaseEncoder
        from pythae.pipelines import TrainingPipeline
        from pythae.trainers import BaseTrainerConfig
        from pythae.trainers.training_callbacks import TrainingCallback
    except ImportError:
        return None
    for name in list(logging.root.manager.loggerDict):  # each pythae module sets its logger to INFO
        if name.startswith("pythae"):
            logging.getLogger(name).setLevel(logging.WARNING)

    class Encoder(BaseEncoder):
        """The project's encoder network; pythae's [0, 1] input mapped to the project's [-1, 1]."""

        def __init__(self, net: torch.nn.Module):
            BaseEncoder.__init__(self)
            self.net = net

        def forward(self, x: torch.Tensor):
            mean, log_variance = self.net(x * 2.0 - 1.0).chunk(2, dim=-1)
            return ModelOutput(embedding=mean, log_covariance=log_variance)

    class Decoder(BaseDecoder):
        """The project's decoder network: Bernoulli probabilities (for pythae's "bce"), or the raw
        (mean, log scale) channels of the discretized logistic."""

        def __init__(self, net: torch.nn.Module, sigmoid: bool):
            BaseDecoder.__init__(self)
            self.net, self.sigmoid = net, sigmoid

        def forward(self, z: torch.Tensor):
            out = self.net(z)
            return ModelOutput(reconstruction=torch.sigmoid(out) if self.sigmoid else out)

    class LogisticVAE(PythaeVAE):
        """pythae's VAE with the project's discretized logistic as its reconstruction loss."""

        def __init__(self, model_config, encoder, decoder):
            super().__init__(model_config, encoder, decoder)
            self.likelihood = DiscretizedLogistic()

        def loss_function(self, recon_x, x, mu, log_var, z):
            # x = v / 255 for 8-bit v: 2x - 1 = v / 127.5 - 1, the project's target (log_prob rounds to v)
            recon_loss = -self.likelihood.log_prob(recon_x, x * 2.0 - 1.0)
            kld = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp(), dim=-1)
            return (recon_loss + kld).mean(dim=0), recon_loss.mean(dim=0), kld.mean(dim=0)

    class EpochTimer(TrainingCallback):
        """From the start of pythae's epoch loop (``on_train_step_begin``, once per epoch) to the end of its
        last step (``on_train_step_end``, after every optimizer step)."""

        def on_train_step_begin(self, training_config, **kwargs):
            self.start, self.end, self.steps = time.perf_counter(), None, 0

        def on_train_step_end(self, training_config, **kwargs):
            self.end, self.steps = time.perf_counter(), self.steps + 1

    return {
        "version": pythae.__version__ if hasattr(pythae, "__version__") else PYTHAE_VERSION,
        "VAE": PythaeVAE, "VAEConfig": VAEConfig, "LogisticVAE": LogisticVAE, "Encoder": Encoder,
        "Decoder": Decoder, "TrainingPipeline": TrainingPipeline, "BaseTrainerConfig": BaseTrainerConfig,
        "EpochTimer": EpochTimer,
    }


def pythae_epoch(pythae: dict[str, Any], spec: dict[str, Any], data: torch.Tensor, fused: bool) -> float:
    """One epoch of pythae's TrainingPipeline over float32 ``data`` in [0, 1]; returns images/s of its
    training steps (see EpochTimer)."""
    project = build_model(spec)  # the same networks and initial weights as the other sides
    bernoulli = spec["likelihood"] == "bernoulli"
    config = pythae["VAEConfig"](
        input_dim=spec["shape"],
        latent_dim=spec["latent_dim"],
        reconstruction_loss="bce" if bernoulli else "mse",  # "mse" unused: LogisticVAE has its own loss
    )
    encoder, decoder = pythae["Encoder"](project.encoder), pythae["Decoder"](project.decoder, bernoulli)
    model = (pythae["VAE"] if bernoulli else pythae["LogisticVAE"])(config, encoder, decoder)
    timer = pythae["EpochTimer"]()
    with (
        tempfile.TemporaryDirectory(prefix="bench-pythae-") as output_dir,
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),  # tqdm's progress bar
    ):
        training = pythae["BaseTrainerConfig"](
            output_dir=output_dir,
            per_device_train_batch_size=spec["batch"],
            num_epochs=1,
            learning_rate=LEARNING_RATE,
            optimizer_cls="Adam",
            optimizer_params={"fused": True} if fused else None,
            train_dataloader_num_workers=0,
            no_cuda=True,
        )
        pythae["TrainingPipeline"](model=model, training_config=training)(train_data=data, callbacks=[timer])
    return len(data) / (timer.end - timer.start)


# ----------------------------------------------------------------------------------------------------------
# A model's rounds
# ----------------------------------------------------------------------------------------------------------
def compare(name: str, base: Params, args, pythae: dict[str, Any] | None, workdir: Path) -> dict[str, Any]:
    spec = MODELS[name]
    count = args.images or spec["images"]
    processed, data_note = prepare_data(name, spec, count, base, workdir)
    images = torch.from_numpy(np.load(processed / "train_images.npy"))
    unit = images.float().div_(255.0) if pythae else None  # pythae's input: float32 in [0, 1]
    params = project_params(base, spec, args.threads)
    sides = [s for s in spec["sides"] if pythae or not s.startswith("pythae")]
    for fused in (False, True):  # warm-up: kernels, allocator, first-call costs (not counted)
        plain_epoch(spec, images, fused, max_steps=3)
        if pythae:
            pythae_epoch(pythae, spec, unit[: 3 * spec["batch"]], fused)
    figures: dict[str, list[float]] = {side: [] for side in sides}
    for round_ in range(args.repeats):  # alternated, so a change of the machine's load hits every side alike
        for side in sides:
            if side == "project":
                value = run_worker(params, processed)["train_images_per_s"]
            elif side.startswith("plain"):
                value = plain_epoch(spec, images, fused=side == "plain_fused")
            else:
                value = pythae_epoch(pythae, spec, unit, fused=side == "pythae_fused")
            figures[side].append(value)
            print(f"  [{name}] round {round_ + 1}/{args.repeats} {side}: {value:,.0f} img/s", flush=True)
    return {"spec": spec, "images": count, "data": data_note, "figures": figures}


def rows_of(name: str, result: dict[str, Any], repeats: int) -> list[tuple[str, str, str]]:
    spec, figures = result["spec"], result["figures"]
    med = {side: median(values) for side, values in figures.items()}
    rows = [
        (
            f"**{spec['title']}**",
            "",
            f"{result['images']:,} images ({result['data']}), batch {spec['batch']}, Adam lr "
            f"{LEARNING_RATE:g}, beta {BETA:g}, 1 epoch per run, median of {repeats} alternated run(s)",
        )
    ]
    for side, values in figures.items():
        spread = f"range {min(values):,.0f}-{max(values):,.0f}"
        rows.append((SIDE_NAMES[side], f"{med[side]:,.0f} img/s", spread))
    for peer, what in (("plain_fused", "the loop's own overhead, the optimizer alike"),
                       ("pythae_fused", "against pythae with the same fused Adam")):
        if peer in med:
            ratio = med["project"] / med[peer]
            rows.append((f"ratio project / {peer.replace('_', '-')}", f"{ratio:.2f}x", what))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds of every side")
    parser.add_argument(
        "--images", type=int, default=None,
        help="training images per run, every model (default: 55,000 for the MLPs, 2,048 for conv)",
    )
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=cores(), help="torch threads of every side")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON")
    args = parser.parse_args(argv)
    unknown = [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; allowed: {', '.join(MODELS)}")
    if args.repeats < 1 or (args.images is not None and args.images < 128):
        parser.error("--repeats must be >= 1 and --images >= 128")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_params(args.params)
    pythae = load_pythae()
    if pythae is None:
        print(INSTALL_HINT)
    load_before = other_load()
    rows: list[tuple[str, str, str]] = []
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as workdir:
        for name in args.models.split(","):
            results[name] = compare(name, base, args, pythae, Path(workdir))
            rows += rows_of(name, results[name], args.repeats)
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python", "benchmarks/peers.py", *map(shlex.quote, given)])
    versions = f"torch {torch.__version__}, " + (
        f"pythae {pythae['version']}" if pythae else "pythae not installed (its rows left out)"
    )
    header = (
        f"### {when} · {cpu_model()}, {cores()} cores\n\n- command: `{command}`\n- commit: {commit()}; "
        f"{versions}; {args.threads} CPU thread(s)\n- load average per core: {load_before:.2f} before, "
        f"{other_load():.2f} after (other jobs on a shared machine lower every figure)\n"
    )
    block = header + "\n" + markdown(rows) + "\n"
    print(block)
    if not args.no_record:
        append_to_section(SECTION, SECTION_INTRO, block)
        print(f"appended to {RESULTS_PATH}")
    if args.json:
        figures = {name: {k: v for k, v in r.items() if k != "spec"} for name, r in results.items()}
        args.json.write_text(json.dumps({"rows": rows, "header": header, "figures": figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
