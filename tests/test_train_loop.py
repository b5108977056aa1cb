"""The per-worker training loop without Ray: the objective of a step, resumption (one rank and two), data
parallelism equal to one process on the same global batches, NaN handling, the data path."""

from __future__ import annotations

import copy
import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import Params
from pipeline.data import BatchSource, evaluation_indices, training_indices
from pipeline.params_file import load_params
from pipeline.sessions import LocalSession, NonFiniteLossError, WorkerConfig
from pipeline.train_loop import (
    run_local,
    set_up,
    train_one_epoch,
    train_worker,
    training_step,
)
from pipeline.train_plan import learning_rate_factor, should_compile
from tests.fixtures.arrays import write_square_arrays
from tests.fixtures.distributed import run_ranks
from tests.fixtures.faults import nan_at_call
from vae.model import ELBOObjective

TRAIN, VALID = 192, 48


def tiny_params(**overrides) -> Params:
    base = {
        "data.dataset": "fashion_mnist",
        "model.architecture": "mlp",
        "model.hidden_dims": [64, 32],
        "model.latent_dim": 4,
        "model.likelihood": "bernoulli",
        "beta_schedule": {"name": "linear", "warmup_steps": 5},
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.log_every_n_steps": 100,
        "train.lr_warmup_steps": 2,
        "evaluate.num_image_rows": 2,
    }
    base.update(overrides)
    return load_params(overrides=base)


@pytest.fixture
def processed(tmp_path):
    """A tiny preprocessed split set (N, 1, 28, 28) uint8 in the preprocess stage's layout."""
    return write_square_arrays(tmp_path / "processed", {"train": TRAIN, "valid": VALID, "test": 48}, 255)


class CrashAfterFirstEpoch(LocalSession):
    """A runner that dies right after the first checkpoint is written (a crash between epochs)."""

    def report(self, metrics, state, epoch):
        super().report(metrics, state, epoch)
        raise KeyboardInterrupt("simulated crash")


def final_state(directory: Path) -> dict:
    return torch.load(sorted(directory.glob("checkpoint_*"))[-1] / "state.pt", weights_only=True)


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    for name, tensor in a.items():
        torch.testing.assert_close(tensor, b[name], rtol=0, atol=atol, msg=f"parameter {name} differs")


# ----------------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "constant", "beta": 0.3},
        {"name": "capacity", "gamma": 7.0, "capacity_max": 2.0, "capacity_steps": 1},
    ],
)
def test_a_step_descends_the_beta_weighted_negative_elbo(processed, tmp_path, schedule):
    """The gradient of a step is exactly that of reconstruction + beta * KL (or gamma |KL - C|) on the
    batch."""
    params = tiny_params(**{"beta_schedule": schedule, "train.grad_clip_norm": 1e9})
    run = set_up(WorkerConfig(params, str(processed)), LocalSession(tmp_path))
    run.step = 3  # C = capacity_max from step 1 on
    x = next(run.train_source.batches(training_indices(TRAIN, 32, 0, 0), 32))
    reference = copy.deepcopy(run.model)
    rng = torch.get_rng_state()
    stats = training_step(run, x).tolist()

    torch.set_rng_state(rng)  # the same reparameterization and binarization noise
    terms = reference.elbo_terms(x)
    kl = terms.kl.mean()
    penalty = 0.3 * kl if schedule["name"] == "constant" else 7.0 * (kl - 2.0).abs()
    loss = terms.reconstruction.mean() + penalty
    loss.backward()
    assert stats[0] == pytest.approx(loss.item(), rel=1e-6)
    for (name, trained), (_, expected) in zip(
        run.model.named_parameters(), reference.named_parameters(), strict=True
    ):
        torch.testing.assert_close(trained.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_gradients_are_clipped_to_the_configured_norm(processed, tmp_path):
    run = set_up(
        WorkerConfig(tiny_params(**{"train.grad_clip_norm": 0.5}), str(processed)), LocalSession(tmp_path)
    )
    x = next(run.train_source.batches(training_indices(TRAIN, 32, 0, 0), 32))
    norm_before = float(training_step(run, x)[3])
    norm_after = float(torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters()]))
    assert norm_before > 0.5 and norm_after == pytest.approx(0.5, rel=1e-4)


def test_beta_shapes_what_training_learns(processed, tmp_path):
    """beta = 0 leaves the KL free (it grows); a large beta squeezes it: the schedule reaches the
    optimiser."""
    kls = {}
    for beta in (0.0, 4.0):
        params = tiny_params(
            **{
                "beta_schedule": {"name": "constant", "beta": beta},
                "train.epochs": 3,
                "train.learning_rate": 3e-3,
            }
        )
        result, _ = run_local(WorkerConfig(params, str(processed)), tmp_path / str(beta))
        kls[beta] = result["history"][-1]["val_kl"]
    assert kls[0.0] > 3 * kls[4.0], kls


# ----------------------------------------------------------------------------------------------------------
# Resumption
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_resumed_training_equals_straight_training(processed, tmp_path, compiled):
    config = WorkerConfig(tiny_params(**{"train.compile": compiled}), str(processed))
    straight, _ = run_local(config, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        train_worker(config, CrashAfterFirstEpoch(tmp_path / "split"))
    assert [c.name for c in (tmp_path / "split").glob("checkpoint_*")] == ["checkpoint_000001"]
    resumed, _ = run_local(config, tmp_path / "split")
    assert resumed["step"] == straight["step"] == 2 * (TRAIN // 32)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert a["step"] == b["step"]
    assert_same_weights(a["model"], b["model"])
    assert [round(h["val_negative_elbo"], 4) for h in a["history"]] == [
        round(h["val_negative_elbo"], 4) for h in b["history"]
    ]


def train_ranks(
    rank: int,
    world_size: int,
    processed: str,
    directory: str,
    params: Params,
    crash: bool = False,
    noise_free: bool = False,
) -> dict:
    """One rank of a gloo-connected training run on a shared checkpoint folder (see run_ranks)."""
    if noise_free:  # z = the posterior mean: runs that differ only in their noise streams become comparable
        from vae.distributions import DiagonalGaussian

        DiagonalGaussian.rsample = lambda self, num_samples=1, generator=None: self.mean.expand(
            num_samples, *self.mean.shape
        )
    session_type = CrashAfterFirstEpoch if crash else LocalSession
    session = session_type(directory, world_rank=rank, world_size=world_size)
    try:
        result = train_worker(WorkerConfig(params, processed), session)
    except KeyboardInterrupt:
        return {"crashed": True}
    return {
        "history": result["history"],
        "model": {k: v.clone() for k, v in _model_state(directory).items()} if rank == 0 else None,
        "rng": torch.get_rng_state(),
    }


def _model_state(directory: str) -> dict:
    return final_state(Path(directory))["model"]


def test_two_ranks_resume_with_their_own_random_state(processed, tmp_path):
    """2 workers: a crash after epoch 1 and a resume give the weights and every rank's noise of the straight
    run."""
    params = tiny_params(**{"train.epochs": 2, "train.batch_size": 16})
    straight = run_ranks(train_ranks, 2, str(processed), str(tmp_path / "straight"), params)
    run_ranks(train_ranks, 2, str(processed), str(tmp_path / "split"), params, True)
    resumed = run_ranks(train_ranks, 2, str(processed), str(tmp_path / "split"), params)
    assert_same_weights(straight[0]["model"], resumed[0]["model"])
    for rank in (0, 1):  # each rank's generator is where it would have been without the crash
        assert torch.equal(straight[rank]["rng"], resumed[rank]["rng"]), f"rank {rank}'s noise differs"
    assert not torch.equal(straight[0]["rng"], straight[1]["rng"]), "the ranks must draw different noise"
    saved = final_state(tmp_path / "split")["rng"]
    assert saved["world_size"] == 2 and len(saved["ranks"]) == 2


def test_a_resume_on_another_number_of_workers_derives_fresh_random_states(processed, tmp_path, capsys):
    """Elastic training: the checkpoint of 2 ranks resumed on 1 draws new, deterministic noise and says so."""
    params = tiny_params(**{"train.epochs": 2, "train.batch_size": 16})
    run_ranks(train_ranks, 2, str(processed), str(tmp_path / "two"), params, True)
    for copy_name in ("a", "b"):
        (tmp_path / copy_name).mkdir()
        checkpoint = next((tmp_path / "two").glob("checkpoint_*"))
        (tmp_path / copy_name / checkpoint.name).mkdir()
        (tmp_path / copy_name / checkpoint.name / "state.pt").write_bytes(
            (checkpoint / "state.pt").read_bytes()
        )
        run_local(WorkerConfig(params, str(processed)), tmp_path / copy_name)
    assert "world size 1 differs from the checkpoint's 2" in capsys.readouterr().out
    assert_same_weights(final_state(tmp_path / "a")["model"], final_state(tmp_path / "b")["model"], atol=0)


def test_an_elastic_resume_draws_the_noise_of_seed_rank_and_step(processed, tmp_path):
    """Resumed on another number of workers, each rank's generator is seeded from (train.seed, rank, step):
    not the saved states of other ranks, and not the noise the run drew from its start."""
    from pipeline.distributed import rank_seed, restore_rng_states

    states = [{"torch": torch.Generator().manual_seed(s).get_state()} for s in (5, 6)]
    saved = {"world_size": 2, "ranks": states}
    torch.manual_seed(rank_seed(0, 0))  # what set_up does before the checkpoint is read
    note = restore_rng_states(saved, rank=0, world_size=1, seed=0, step=40, device=torch.device("cpu"))
    assert "world size 1 differs from the checkpoint's 2" in note
    assert torch.equal(torch.get_rng_state(), torch.Generator().manual_seed(rank_seed(0, 0, 40)).get_state())
    assert rank_seed(0, 0, 40) not in (rank_seed(0, 0), rank_seed(0, 0, 41), rank_seed(0, 1, 40))


class DiesWritingTheSecondCheckpoint(LocalSession):
    """A runner killed while it writes epoch 2's checkpoint: that checkpoint never exists."""

    def report(self, metrics, state, epoch):
        if epoch == 2:
            raise KeyboardInterrupt("killed while writing the checkpoint")
        super().report(metrics, state, epoch)


def test_an_epochs_records_reach_mlflow_only_once_its_checkpoint_is_written(processed, tmp_path):
    """An attempt killed before its checkpoint is written has sent nothing of that epoch: the resumed attempt
    trains it again and logs it once."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("commit")).info.run_id
    params = tiny_params(**{"train.epochs": 2, "train.log_every_n_steps": 1})
    config = WorkerConfig(params, str(processed), run_id, uri)
    with pytest.raises(KeyboardInterrupt):
        train_worker(config, DiesWritingTheSecondCheckpoint(tmp_path / "checkpoints"))
    steps_per_epoch = TRAIN // 32
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, steps_per_epoch + 1))
    assert [m.step for m in client.get_metric_history(run_id, "val_negative_elbo")] == [steps_per_epoch]


class SlowEpochs(LocalSession):
    """A runner whose checkpoints take 1.5 s to write: training lasts long enough for the system metrics'
    one-second samples."""

    def report(self, metrics, state, epoch):
        time.sleep(1.5)
        super().report(metrics, state, epoch)


@pytest.mark.parametrize("interval", [1, None])
def test_training_logs_the_nodes_system_metrics_beside_the_model_metrics(processed, tmp_path, interval):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("system")).info.run_id
    params = tiny_params(**{"train.epochs": 2, "mlflow.system_metrics_interval_s": interval})
    train_worker(WorkerConfig(params, str(processed), run_id, uri), SlowEpochs(tmp_path / "checkpoints"))
    metrics = client.get_run(run_id).data.metrics
    assert "val_negative_elbo" in metrics
    system = {key for key in metrics if key.startswith("system/")}
    if interval is None:
        assert system == set()
    else:
        wanted = {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"}
        assert wanted <= system, metrics
        assert 0 < metrics["system/system_memory_usage_megabytes"]


# ----------------------------------------------------------------------------------------------------------
# Data parallelism
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", [{"name": "linear", "warmup_steps": 5}, "capacity"])
def test_two_ranks_equal_one_process_on_the_same_global_batches(processed, tmp_path, monkeypatch, schedule):
    """DDP: both ranks hold identical weights after every step, equal (to float rounding) to one process
    training on the whole global batches. Noise-free (z = posterior mean, a likelihood without target noise),
    so that only the data split and the gradient averaging can differ. Capacity annealing's |KL - C| is not
    linear in the batch: with C at the median KL of the first images and one image per rank, the ranks' signs
    differ on many steps, and only the global batch's KL gives one process's gradient."""
    overrides = {"model.likelihood": "discretized_logistic", "train.epochs": 1, "train.grad_clip_norm": None}
    if schedule == "capacity":
        overrides.update({"train.batch_size": 2, "train.max_steps_per_epoch": 24})
        probe = set_up(
            WorkerConfig(tiny_params(**overrides), str(processed)), LocalSession(tmp_path / "probe")
        )
        x = torch.from_numpy(np.load(processed / "train_images.npy")[:64])
        median_kl = float(probe.model.encode(x).kl_divergence().median().detach())
        schedule = {"name": "capacity", "gamma": 5.0, "capacity_max": median_kl, "capacity_steps": 1}
    params = tiny_params(beta_schedule=schedule, **overrides)
    ranks = run_ranks(train_ranks, 2, str(processed), str(tmp_path / "two"), params, False, True)

    from vae.distributions import DiagonalGaussian

    monkeypatch.setattr(
        DiagonalGaussian,
        "rsample",
        lambda self, num_samples=1, generator=None: self.mean.expand(num_samples, *self.mean.shape),
    )
    single, _ = run_local(WorkerConfig(params, str(processed)), tmp_path / "one")
    two = final_state(tmp_path / "two")["model"]
    assert_same_weights(two, final_state(tmp_path / "one")["model"], atol=2e-5)
    assert ranks[0]["history"][-1]["step"] == single["step"]
    assert ranks[0]["history"][-1]["val_negative_elbo"] == pytest.approx(
        single["history"][-1]["val_negative_elbo"], rel=1e-4
    )


def identical_ranks(rank: int, world_size: int, processed: str, directory: str, params: Params) -> dict:
    """The parameters of this rank's model after an epoch (not only rank 0's checkpoint). BatchNorm's running
    statistics are per rank (each rank normalises its own part of the batch; DDP copies rank 0's buffers to
    the others at the start of each forward pass), so they are not compared."""
    from pipeline.train_loop import set_up as make_run
    from pipeline.train_loop import train_one_epoch

    run = make_run(
        WorkerConfig(params, processed), LocalSession(directory, world_rank=rank, world_size=world_size)
    )
    train_one_epoch(run, 0)
    return {name: tensor.detach().clone() for name, tensor in run.model.named_parameters()}


def test_ddp_ranks_hold_identical_weights_after_training(processed, tmp_path):
    params = tiny_params(
        **{"train.batch_size": 16, "model.architecture": "conv", "model.hidden_dims": [8, 16]}
    )
    ranks = run_ranks(identical_ranks, 2, str(processed), str(tmp_path), params)
    assert_same_weights(ranks[0], ranks[1], atol=0)


def test_training_indices_are_disjoint_whole_batches_and_independent_of_the_world_size():
    shares = [training_indices(1000, 16, epoch=0, seed=3, rank=r, world_size=3) for r in range(3)]
    assert {len(s) for s in shares} == {(1000 // 48) * 16}
    flat = np.concatenate(shares)
    assert len(np.unique(flat)) == len(flat)
    np.testing.assert_array_equal(training_indices(1000, 16, 0, 3, 1, 3), shares[1])
    assert not np.array_equal(training_indices(1000, 16, epoch=1, seed=3, rank=1, world_size=3), shares[1])
    # Global batch t holds the same images on 1, 2 or 4 workers.
    one = training_indices(1000, 32, 5, 7)
    for world_size in (2, 4):
        local = 32 // world_size
        parts = [training_indices(1000, local, 5, 7, r, world_size) for r in range(world_size)]
        for t in range(1000 // 32):
            together = np.concatenate([p[t * local : (t + 1) * local] for p in parts])
            assert set(together.tolist()) == set(one[t * 32 : (t + 1) * 32].tolist())
    with pytest.raises(ValueError, match="rank"):
        training_indices(10, 2, 0, 0, rank=2, world_size=2)


def test_evaluation_indices_cover_every_image_once():
    for num_images, world_size in ((10, 1), (10, 3), (7, 8)):
        shares = [evaluation_indices(num_images, r, world_size) for r in range(world_size)]
        assert sorted(np.concatenate(shares).tolist()) == list(range(num_images))


# ----------------------------------------------------------------------------------------------------------
# Failures
# ----------------------------------------------------------------------------------------------------------
def test_nan_loss_stops_with_error_and_last_checkpoint_is_finite(processed, tmp_path):
    params = tiny_params(**{"train.epochs": 3})
    steps_per_epoch = TRAIN // 32
    with nan_at_call(steps_per_epoch + 2), pytest.raises(NonFiniteLossError) as raised:
        train_worker(WorkerConfig(params, str(processed)), LocalSession(tmp_path))
    message = str(raised.value)
    assert f"epoch 2, step {steps_per_epoch + 2}: loss=nan" in message and "train.learning_rate" in message
    checkpoints = sorted(tmp_path.glob("checkpoint_*"))
    assert [c.name for c in checkpoints] == ["checkpoint_000001"]
    state = torch.load(checkpoints[0] / "state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_nan_step_leaves_the_weights_of_the_step_before_though_the_host_learns_of_it_later(
    processed, tmp_path, monkeypatch, where
):
    """The host reads the non-finite flag only at the epoch's end here (24 steps, no logging step): the steps
    after the bad one still run, but neither they nor it change the weights or the optimizer's state, and the
    error names the first bad step. "gradient": the loss stays finite and only the gradients turn NaN (the
    classic torch.where trap: a NaN in the branch not taken), which the gradient check must catch."""
    params = tiny_params(**{"train.batch_size": 8, "train.log_every_n_steps": 10**6, "train.epochs": 1})
    run = set_up(WorkerConfig(params, str(processed)), LocalSession(tmp_path))
    bad, before = 9, {}
    original, calls = ELBOObjective.forward, itertools.count()

    def forward(self, x, num_samples=1):
        reconstruction, kl_per_dim = original(self, x, num_samples)
        if next(calls) == bad:  # the weights now are those after step bad - 1
            before["weights"] = copy.deepcopy(self.model.state_dict())
            before["optimizer"] = copy.deepcopy(run.optimizer.state_dict())
            if where == "loss":
                reconstruction = reconstruction * float("nan")
            else:
                zero = torch.zeros_like(reconstruction)
                reconstruction = reconstruction + torch.where(zero > 0, (reconstruction - 1e9).sqrt(), zero)
        return reconstruction, kl_per_dim

    monkeypatch.setattr(ELBOObjective, "forward", forward)
    loss = "nan" if where == "loss" else r"[0-9.]+ grad_norm=\(not computed\)"
    with pytest.raises(NonFiniteLossError, match=rf"^epoch 1, step {bad}: loss={loss} .*not updated"):
        train_one_epoch(run, 0)
    assert next(calls) == TRAIN // 8  # every step ran: the flag was read once, at the end
    assert_same_weights(run.model.state_dict(), before["weights"])
    after = run.optimizer.state_dict()["state"]
    for index, state in before["optimizer"]["state"].items():
        for key, tensor in state.items():
            torch.testing.assert_close(after[index][key], tensor, rtol=0, atol=0, msg=f"{index} {key}")


def test_a_compiled_step_stops_on_nan_naming_the_step(processed, tmp_path, monkeypatch):
    """torch.compile'd model and loss: the non-finite check outside it still stops the run at the first bad
    step with the weights before it (the NaN enters through the KL penalty, outside the compiled module)."""
    from pipeline import train_loop

    params = tiny_params(**{"train.batch_size": 8, "train.log_every_n_steps": 10**6, "train.compile": True})
    run = set_up(WorkerConfig(params, str(processed)), LocalSession(tmp_path))
    assert run.objective is not run.model and "Optimized" in type(run.objective).__name__
    bad, before, penalty = 7, {}, train_loop.kl_penalty

    def poisoned(schedule, kl, step, batch_mean_kl=None):
        if step == bad:
            before.update(copy.deepcopy(run.model.state_dict()))
            return penalty(schedule, kl, step, batch_mean_kl) * float("nan")
        return penalty(schedule, kl, step, batch_mean_kl)

    monkeypatch.setattr(train_loop, "kl_penalty", poisoned)
    with pytest.raises(NonFiniteLossError, match=rf"^epoch 1, step {bad}: loss=nan"):
        train_one_epoch(run, 0)
    assert run.step == TRAIN // 8 and before
    assert_same_weights(run.model.state_dict(), before)


def diverging_rank(rank: int, world_size: int, processed: str, directory: str, params: Params) -> dict:
    """Rank 1 alone gets a NaN loss at its 5th step (0-based), with finite gradients (the NaN is added
    outside the graph), so only the loss of one rank tells; returns this rank's error and weights."""
    run = set_up(
        WorkerConfig(params, processed), LocalSession(directory, world_rank=rank, world_size=world_size)
    )
    original, calls = ELBOObjective.forward, itertools.count()

    def forward(self, x, num_samples=1):
        reconstruction, kl_per_dim = original(self, x, num_samples)
        if next(calls) == 5 and rank == 1:
            reconstruction = reconstruction + torch.full_like(reconstruction, float("nan"))
        return reconstruction, kl_per_dim

    ELBOObjective.forward = forward
    with pytest.raises(NonFiniteLossError) as raised:
        train_one_epoch(run, 0)
    return {"error": str(raised.value), "weights": run.model.state_dict()}


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step_with_the_same_weights(processed, tmp_path):
    params = tiny_params(**{"train.batch_size": 16, "train.log_every_n_steps": 10**6, "train.epochs": 1})
    ranks = run_ranks(diverging_rank, 2, str(processed), str(tmp_path), params)
    assert all(r["error"].startswith("epoch 1, step 5: ") for r in ranks), [r["error"] for r in ranks]
    assert_same_weights(ranks[0]["weights"], ranks[1]["weights"])


# What hands a tensor's value to the host (and so waits for the device): wrapped in the test below.
HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"train.grad_clip_norm": 0.5},
        {"beta_schedule": {"name": "capacity", "gamma": 7.0, "capacity_max": 2.0, "capacity_steps": 5}},
    ],
)
def test_the_training_steps_never_wait_for_the_device(processed, tmp_path, monkeypatch, settings):
    """The host reads tensors a fixed number of times per epoch, however many steps it has: no step reads
    one (the figures, the non-finite check and clipping stay on the device)."""
    reads: dict[int, list[str]] = {}
    for steps in (6, 18):
        params = tiny_params(
            **{"train.batch_size": 8, "train.log_every_n_steps": 10**6, "train.max_steps_per_epoch": steps,
               **settings}
        )
        run = set_up(WorkerConfig(params, str(processed)), LocalSession(tmp_path / str(steps)))
        log = reads[steps] = []
        with monkeypatch.context() as patch:
            for name in HOST_READS:
                original = getattr(torch.Tensor, name)

                def counted(self, *args, _name=name, _original=original, _log=log, **kwargs):
                    _log.append(_name)
                    return _original(self, *args, **kwargs)

                patch.setattr(torch.Tensor, name, counted)
            train_one_epoch(run, 0)
        assert run.step == steps
    assert len(reads[18]) == len(reads[6]) <= 2, reads


def test_missing_data_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro preprocess"):
        run_local(WorkerConfig(tiny_params(), str(tmp_path / "nothing")), tmp_path / "ck")


def test_compile_auto_compiles_only_where_the_measured_compile_time_pays_back_within_an_epoch():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    auto, on, off = (tiny_params(**{"train.compile": value}).train for value in ("auto", True, False))
    celeba = 162_770
    assert should_compile(auto, "resnet", cpu, celeba) and not should_compile(auto, "resnet", cpu, 60_000)
    assert not should_compile(auto, "conv", cpu, celeba) and should_compile(auto, "conv", cpu, 300_000)
    assert not should_compile(auto, "mlp", cpu, 55_000) and not should_compile(auto, "resnet", gpu, celeba)
    assert should_compile(on, "mlp", cpu, 10) and not should_compile(off, "resnet", cpu, celeba)


def test_learning_rate_schedule():
    assert learning_rate_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert learning_rate_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(10, 100, 10, "cosine") == pytest.approx(1.0)
    assert learning_rate_factor(100, 100, 10, "cosine") == pytest.approx(0.1)
    assert learning_rate_factor(55, 100, 10, "cosine") == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))
    )
    assert learning_rate_factor(55, 100, 10, "constant") == 1.0


@pytest.mark.parametrize("on_device", [False, True])
def test_batch_source_gathers_whole_batches_for_training_and_every_image_for_evaluation(on_device):
    images = np.arange(10 * 1 * 2 * 2, dtype=np.uint8).reshape(10, 1, 2, 2)
    source = BatchSource(images, torch.device("cpu"), on_device)
    order = np.array([7, 2, 9, 0, 4, 1, 8, 3, 6, 5])
    train = list(source.batches(order, 3))
    assert [b.shape[0] for b in train] == [3, 3, 3]  # the ragged end (one index) dropped
    # Each batch holds the images of its indices (gathered in sorted order from a memory map when not
    # resident).
    assert all(
        sorted(b[:, 0, 0, 0].tolist()) == sorted((order[3 * i : 3 * i + 3] * 4).tolist())
        for i, b in enumerate(train)
    )
    assert len(list(source.batches(order, 3, max_batches=2))) == 2
    evaluation = list(source.all_batches(order, 4))
    assert [b.shape[0] for b in evaluation] == [4, 4, 2]
    assert sorted(torch.cat(evaluation)[:, 0, 0, 0].tolist()) == [4 * i for i in range(10)]
    # The other path (resident on the device, or read from the host array) gives the very same batches.
    other = BatchSource(images, torch.device("cpu"), not on_device)
    for mine, theirs in zip(train, other.batches(order, 3), strict=True):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("stage", ["train", "tune"])
@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train.batch_size": 256}, r"training split \(192 images\) is smaller than one batch of 256"),
        ({"train.batch_size": 2, "train.num_workers": 4, "tune.workers_per_trial": 4},
         r"train.batch_size \(2\) must be >= the number of workers \(4\)"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_ray_starts(tmp_path, monkeypatch, stage, overrides,
                                                                 message):
    """A batch larger than the training split, or smaller than the number of workers, fails the same way on
    every retry: the train and tune stages refuse it before they start Ray, naming the setting."""
    from pipeline import ray_runtime
    from pipeline import train as train_stage
    from pipeline.common import StageError
    from pipeline.tune import sweep as tune_stage

    monkeypatch.setenv("VAE_PROJECT_ROOT", str(tmp_path))
    splits = {"train": TRAIN, "valid": VALID, "test": 48}
    write_square_arrays(tmp_path / "data/processed/fashion_mnist", splits)

    def started(*args, **kwargs):
        raise AssertionError("Ray was started for settings that cannot work")

    monkeypatch.setattr(ray_runtime, "connect_ray", started)
    run = train_stage.train if stage == "train" else tune_stage.tune_sweep
    with pytest.raises(StageError, match=message + r".*\(nothing was started\)"):
        run(tiny_params(**overrides))
