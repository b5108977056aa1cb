"""The GPU paths, proved on the card (``pytest -m gpu``; benchmarks/gpu_check.sh runs them first): a training
step on CUDA equals the CPU step, the steady-state steps never synchronize with the host, bf16 autocast tracks
fp32, data resident on the device gives the host path's batches, checkpoint/resume on CUDA is exact (CUDA
random state included), the evaluate stage's NLL on CUDA equals the CPU value and the linear-Gaussian model's
estimate its exact log p(x).

Skipped where no CUDA device is present. ``VAE_TEST_DEVICE=cpu`` points them at the CPU (the dry run of
benchmarks/gpu_check.sh: the same code end to end, trivially equal figures); ``VAE_TEST_BF16_STEPS`` shortens
the bf16 run there. Multi-worker DDP on NCCL needs a GPU per rank and is not covered on one card.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from pipeline.data import BatchSource, training_indices
from pipeline.evaluate import test_figures as evaluate_figures
from pipeline.params_file import load_params
from pipeline.sessions import LocalSession, WorkerConfig
from pipeline.train_loop import run_local, set_up, training_step
from tests.fixtures.arrays import write_square_arrays
from tests.test_evaluate import linear_gaussian_vae
from tests.test_train_loop import CrashAfterFirstEpoch, final_state
from vae.networks import ARCHITECTURES

DEVICE = torch.device(os.environ.get("VAE_TEST_DEVICE", "cuda"))
BF16_STEPS = int(os.environ.get("VAE_TEST_BF16_STEPS", "200"))
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.fixture(autouse=True)
def exact_float32():
    """fp32 means fp32: no TF32 in matmuls and convolutions while these tests compare against the CPU."""
    if DEVICE.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def params_for(device: torch.device, **overrides):
    values = {
        "data.dataset": "fashion_mnist",
        "model.architecture": "conv",
        "model.hidden_dims": [16, 32],
        "model.latent_dim": 8,
        "model.likelihood": "discretized_logistic",
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.log_every_n_steps": 1000,
        "train.use_gpu": device.type == "cuda",
        "train.precision": "fp32",
        "train.data_on_device": "always" if device.type == "cuda" else "never",
        "evaluate.num_image_rows": 2,
    }
    values.update(overrides)
    return load_params(overrides=values)


@pytest.fixture
def processed(tmp_path):
    return write_square_arrays(tmp_path / "processed", {"train": 256, "valid": 64, "test": 64}, 220)


def gradients(run, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The gradient of the negative ELBO (beta = 1) at the posterior mean (no sampling noise, so the CPU and
    the device compute the same function), by parameter name, on the CPU."""
    from vae.distributions import DiagonalGaussian

    rsample = DiagonalGaussian.rsample
    DiagonalGaussian.rsample = lambda self, num_samples=1, generator=None: self.mean.expand(
        num_samples, *self.mean.shape)
    try:
        reconstruction, kl_per_dim = run.objective(x.to(run.device), 1)
        (reconstruction.mean() + kl_per_dim.sum(-1).mean()).backward()
    finally:
        DiagonalGaussian.rsample = rsample
    return {name: p.grad.detach().cpu() for name, p in run.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("settings", [{}, {"train.grad_clip_norm": 1.0, "train.precision": "bf16"}])
def test_steady_state_training_steps_never_synchronize_with_the_host(processed, tmp_path, settings):
    """CUDA's sync debug mode turns any host synchronization (``.item()``, a blocking copy, a data-dependent
    shape) into an error: none may happen in a training step once the first has warmed up."""
    params = params_for(DEVICE, **{"train.log_every_n_steps": 10**6, **settings})
    run = set_up(WorkerConfig(params, str(processed)), LocalSession(tmp_path))
    batches = run.train_source.batches(training_indices(256, 32, 0, 0), 32)
    run.figures.record(run.step, training_step(run, next(batches)))  # lazy optimizer state, first kernels
    if DEVICE.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        for x in batches:
            run.figures.record(run.step, training_step(run, x))
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    rows = run.figures.read()
    assert [step for step, _ in rows] == list(range(8)) and not any(row[4] for _, row in rows), rows


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_training_step_on_the_device_equals_the_cpu_step(processed, tmp_path, architecture):
    hidden = [64, 32] if architecture == "mlp" else [16, 32]
    runs = [set_up(WorkerConfig(params_for(device, **{"model.architecture": architecture,
                                                      "model.hidden_dims": hidden}), str(processed)),
                   LocalSession(tmp_path / device.type / architecture))
            for device in (torch.device("cpu"), DEVICE)]
    x = torch.from_numpy(np.load(processed / "train_images.npy")[:32])
    on_cpu, on_device = (gradients(run, x) for run in runs)
    assert on_cpu.keys() == on_device.keys() and on_cpu
    for name, grad in on_cpu.items():
        torch.testing.assert_close(on_device[name], grad, rtol=1e-3, atol=1e-5, msg=f"{name} differs")


def test_bf16_autocast_training_tracks_fp32(processed, tmp_path):
    """The reference architecture trained BF16_STEPS steps in bf16 autocast and in fp32 from the same
    weights and data: the final training -ELBO within 2% (bf16 rounds activations, not the fp32 weights)."""
    steps_per_epoch = 256 // 32
    epochs = max(1, BF16_STEPS // steps_per_epoch)
    finals = {}
    for precision in ("fp32", "bf16"):
        params = params_for(DEVICE, **{"train.precision": precision, "train.epochs": epochs,
                                       "model.hidden_dims": [32, 64, 128]})
        result, _ = run_local(WorkerConfig(params, str(processed)), tmp_path / precision)
        finals[precision] = result["history"][-1]["train_negative_elbo"]
    assert abs(finals["bf16"] - finals["fp32"]) <= 0.02 * abs(finals["fp32"]), finals


def test_data_resident_on_the_device_gives_the_host_paths_batches(processed):
    images = np.load(processed / "train_images.npy")
    indices = training_indices(len(images), 16, epoch=1, seed=3, rank=1, world_size=2)
    resident = BatchSource(images, DEVICE, on_device=True)
    host = BatchSource(images, DEVICE, on_device=False)
    pairs = list(zip(resident.batches(indices, 16), host.batches(indices, 16), strict=True))
    assert len(pairs) == len(indices) // 16
    for on_device, from_host in pairs:
        assert on_device.device.type == DEVICE.type and torch.equal(on_device, from_host)


def test_checkpoint_resume_on_the_device_is_exact(processed, tmp_path):
    """2 epochs straight == a crash after epoch 1 and a resume: the weights and the device's random state."""
    params = params_for(DEVICE, **{"model.architecture": "mlp", "model.hidden_dims": [64, 32]})
    config = WorkerConfig(params, str(processed))
    run_local(config, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        from pipeline.train_loop import train_worker

        train_worker(config, CrashAfterFirstEpoch(tmp_path / "split"))
    run_local(config, tmp_path / "split")
    straight, resumed = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for key in ("torch", "cuda"):
        if key in straight["rng"]["ranks"][0]:
            assert torch.equal(straight["rng"]["ranks"][0][key], resumed["rng"]["ranks"][0][key]), key
    if DEVICE.type == "cuda":
        assert "cuda" in straight["rng"]["ranks"][0], "the CUDA random state is not checkpointed"


def test_the_evaluate_stages_nll_on_the_device_equals_the_cpu_value(processed):
    from vae.model import VAE

    torch.manual_seed(0)
    model = VAE("conv", (1, 28, 28), 8, [16, 32], "discretized_logistic").eval()
    images = np.load(processed / "test_images.npy")
    on_cpu, on_device = (evaluate_figures(model, images, 32, 16, 32, device) for device in
                         (torch.device("cpu"), DEVICE))
    for key in ("test_nll", "test_negative_elbo", "test_reconstruction_mse"):
        assert on_device[key] == pytest.approx(on_cpu[key], rel=1e-4), key


def test_the_linear_gaussian_models_estimate_on_the_device_is_its_exact_log_likelihood():
    from tests.test_evaluate import SIGMA, exact_expected_log_likelihood

    model, weight, bias = linear_gaussian_vae()
    with torch.no_grad():
        y = model.sample(300, torch.Generator().manual_seed(1)) + SIGMA * torch.randn(
            300, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    images = (y.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    exact = exact_expected_log_likelihood(images, weight, bias)
    figures = evaluate_figures(model, images, 64, 16, 100, DEVICE)
    assert figures["test_nll"] == pytest.approx(-float(exact.mean()), abs=0.05)
