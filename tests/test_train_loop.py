"""The per-worker training loop without Ray: resumption, NaN handling, data partitioning, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import load_params
from pipeline.train_loop import (
    BatchSource,
    LocalSession,
    NonFiniteLossError,
    learning_rate_factor,
    load_state,
    rank_indices,
    run_local,
    train_worker,
)
from tests.fixtures.arrays import write_square_arrays


def tiny_params(**overrides):
    base = {
        "data.dataset": "fashion_mnist", "model.architecture": "mlp", "model.hidden_dims": [64, 32], "model.latent_dim": 4,
        "model.likelihood": "bernoulli", "beta_schedule": {"name": "linear", "warmup_steps": 5},
        "train.epochs": 2, "train.batch_size": 32, "train.log_every_n_steps": 100, "train.lr_warmup_steps": 2,
        "evaluate.num_image_rows": 2,
    }
    base.update(overrides)
    return load_params(overrides=base).model_dump(mode="json")


@pytest.fixture
def processed(tmp_path):
    """A tiny preprocessed split set (N, 1, 28, 28) uint8 in the preprocess stage's layout."""
    return write_square_arrays(tmp_path / "processed", {"train": 192, "valid": 48, "test": 48}, 255)


class CrashAfterFirstEpoch(LocalSession):
    """A runner that dies right after the first checkpoint is written (a crash between epochs)."""

    def report(self, metrics, state, epoch):
        super().report(metrics, state, epoch)
        raise KeyboardInterrupt("simulated crash")


def test_resumed_training_equals_straight_training(processed, tmp_path):
    config = {"params": tiny_params(), "processed_dir": str(processed)}
    straight, _ = run_local(config, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train_worker(config, CrashAfterFirstEpoch(tmp_path / "split"))
    assert [c.name for c in (tmp_path / "split").glob("checkpoint_*")] == ["checkpoint_000001"]
    resumed, _ = run_local(config, tmp_path / "split")
    assert resumed["step"] == straight["step"] == 2 * (192 // 32)
    a = load_state(tmp_path / "straight" / "checkpoint_000002")
    b = load_state(tmp_path / "split" / "checkpoint_000002")
    assert a["step"] == b["step"]
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], rtol=0, atol=1e-6, msg=f"parameter {name} differs")
    assert [round(h["val_negative_elbo"], 4) for h in a["history"]] == [round(h["val_negative_elbo"], 4) for h in b["history"]]


def test_training_lowers_the_negative_elbo(processed, tmp_path):
    result, _ = run_local({"params": tiny_params(**{"train.epochs": 4, "train.learning_rate": 3e-3}), "processed_dir": str(processed)}, tmp_path)
    history = result["history"]
    assert history[-1]["val_negative_elbo"] < history[0]["val_negative_elbo"] - 10


def test_nan_loss_stops_with_error_and_last_checkpoint_is_finite(processed, tmp_path):
    params = tiny_params(**{"train.epochs": 3})
    steps_per_epoch = 192 // 32
    session = LocalSession(tmp_path)
    with pytest.raises(NonFiniteLossError, match=rf"step {steps_per_epoch + 2} \(epoch 1\)"):
        train_worker({"params": params, "processed_dir": str(processed),
                      "fault_injection": {"nan_at_step": steps_per_epoch + 2}}, session)
    checkpoints = sorted(tmp_path.glob("checkpoint_*"))
    assert [c.name for c in checkpoints] == ["checkpoint_000001"]
    state = load_state(checkpoints[0])
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


def test_missing_data_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro preprocess"):
        run_local({"params": tiny_params(), "processed_dir": str(tmp_path / "nothing")}, tmp_path / "ck")


def test_rank_indices_are_disjoint_equal_and_reshuffled():
    shares = [rank_indices(1000, 16, epoch=0, seed=3, rank=r, world_size=3) for r in range(3)]
    assert len({s.numel() for s in shares}) == 1 and shares[0].numel() % 16 == 0
    flat = torch.cat(shares)
    assert flat.unique().numel() == flat.numel()
    again = rank_indices(1000, 16, epoch=0, seed=3, rank=1, world_size=3)
    assert torch.equal(again, shares[1])
    assert not torch.equal(rank_indices(1000, 16, epoch=1, seed=3, rank=1, world_size=3), shares[1])


def test_learning_rate_schedule():
    assert learning_rate_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert learning_rate_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(100, 100, 10, "cosine") == pytest.approx(0.1)
    assert learning_rate_factor(55, 100, 10, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert learning_rate_factor(55, 100, 10, "constant") == 1.0


@pytest.mark.parametrize("on_device", [False, True])
def test_batch_source_gathers_whole_batches_for_training_and_every_image_for_evaluation(on_device):
    images = np.arange(10 * 1 * 2 * 2, dtype=np.uint8).reshape(10, 1, 2, 2)
    source = BatchSource(images, torch.device("cpu"), on_device)
    order = torch.tensor([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
    train = list(source.batches(order, 3))
    assert [b.shape[0] for b in train] == [3, 3, 3]  # the ragged end (one index) dropped
    # Each batch holds the images of its indices (gathered in sorted order from a memory map when not resident).
    assert all(sorted(b[:, 0, 0, 0].tolist()) == sorted((order[3 * i:3 * i + 3] * 4).tolist()) for i, b in enumerate(train))
    assert len(list(source.batches(order, 3, max_batches=2))) == 2
    evaluation = list(source.all_batches(order, 4))
    assert [b.shape[0] for b in evaluation] == [4, 4, 2]
    assert sorted(torch.cat(evaluation)[:, 0, 0, 0].tolist()) == [4 * i for i in range(10)]
