"""Per-image test figures (pipeline.scoring): each image's draws are its own, so its log p(x) does not depend
on the batch, the chunking of the K samples or the number of workers; the chunk size follows free memory; the
cost is projected and warned about; bad settings fail before any work."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import scoring
from pipeline.common import StageError
from vae.model import VAE

SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = VAE("mlp", SHAPE, 4, [32], "discretized_logistic").eval()
    images = np.random.default_rng(0).integers(0, 256, (23, *SHAPE), dtype=np.uint8)
    return model, images


@pytest.fixture(scope="module")
def ray_instance():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


def settings(**overrides):
    values = {"num_workers": 1, "num_samples": 20, "seed": 7, "batch_size": 5, "importance_batch_size": 3,
              "precision": "fp32"}
    values.update(overrides)
    return values


def score(model, images, indices, batch_size, per_pass, num_samples=20, seed=7):
    return scoring.score_images(model, images, np.asarray(indices), num_samples, seed, torch.device("cpu"),
                                batch_size, per_pass)


def test_an_images_figures_do_not_depend_on_batch_or_chunking(model_and_images):
    model, images = model_and_images
    everything = score(model, images, range(len(images)), batch_size=23, per_pass=20)
    small = score(model, images, range(len(images)), batch_size=4, per_pass=3)
    alone = score(model, images, [17], batch_size=1, per_pass=7)
    for name in ("log_px", "reconstruction", "kl", "squared_error"):
        np.testing.assert_allclose(getattr(small, name), getattr(everything, name), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(
            getattr(alone, name)[0], getattr(everything, name)[17], rtol=1e-5, atol=1e-4
        )
    # ... while the seed and the image index do matter: the draws are not shared between images
    reseeded = score(model, images, range(len(images)), batch_size=23, per_pass=20, seed=8)
    assert not np.allclose(reseeded.log_px, everything.log_px)
    duplicate = np.stack([images[3], images[3]])
    twins = score(model, duplicate, [0, 1], batch_size=2, per_pass=20)
    assert twins.log_px[0] != twins.log_px[1]


@pytest.mark.parametrize("num_samples", [1, 3])
def test_the_estimate_is_the_log_mean_of_the_importance_weights(model_and_images, num_samples):
    """log p(x) ~= log (1/K) sum_k w_k, w_k = p(x|z_k) p(z_k) / q(z_k|x), at the image's own K draws
    (recomputed here from its generator); with K = 20 the estimate is higher on average than the ELBO (Burda
    et al. 2016, theorem 1)."""
    from vae.distributions import standard_normal_log_prob

    model, images = model_and_images
    scored = score(model, images, range(len(images)), 23, 2, num_samples=num_samples)
    for index in (0, 11):
        generator = scoring.image_generator(7, index)
        x = torch.from_numpy(images[index : index + 1])
        target = model.likelihood.prepare_target(x, generator)
        torch.randn(model.latent_dim, generator=generator)  # the ELBO's draw comes first
        eps = torch.randn(num_samples, model.latent_dim, generator=generator)
        with torch.no_grad():
            posterior = model.encode(x)
            z = posterior.mean + posterior.std * eps  # (K, D): K draws of the one image
            log_w = (model.likelihood.log_prob(model.decode(z), target.expand(num_samples, *target.shape[1:]))
                     + standard_normal_log_prob(z) - posterior.log_prob(z))
        expected = torch.logsumexp(log_w.double(), dim=0) - np.log(num_samples)
        assert scored.log_px[index] == pytest.approx(float(expected), abs=1e-4)
    k20 = score(model, images, range(len(images)), 23, 20, num_samples=20)
    assert -k20.log_px.mean() < (k20.reconstruction + k20.kl).mean()


def test_one_and_two_ray_workers_give_identical_per_image_values(model_and_images, ray_instance):
    """The same draws and the same arithmetic per image whatever the worker count: equal up to float32
    rounding (a matrix product's sums can run in another order for another batch size or thread count)."""
    model, images = model_and_images
    one = scoring.score_shards(model, images, settings(), use_ray=True)
    two = scoring.score_shards(model, images, settings(num_workers=2), use_ray=True)
    here = scoring.score_shards(model, images, settings(), use_ray=False)
    np.testing.assert_array_equal(two.indices, np.arange(len(images)))
    for name in ("log_px", "reconstruction", "kl", "squared_error", "posterior_mean"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), rtol=1e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(getattr(here, name), getattr(one, name), rtol=1e-6, atol=1e-4)
    assert two.decodes == one.decodes == here.decodes


def test_more_workers_than_the_cluster_has_fails_before_any_work(model_and_images, ray_instance):
    model, images = model_and_images
    with pytest.raises(StageError, match=r"evaluate.num_workers=3 .* 2 CPUs"):
        scoring.score_shards(model, images, settings(num_workers=3), use_ray=True)
    with pytest.raises(StageError, match="more than the 23 test images"):
        scoring.score_shards(model, images, settings(num_workers=24), use_ray=True)
    with pytest.raises(StageError, match="num_importance_samples must be >= 1"):
        score(model, images, [0], 1, 1, num_samples=0)


def test_auto_chunk_size_follows_free_memory(model_and_images, monkeypatch):
    model, _ = model_and_images
    per_row = scoring.decoder_bytes_per_row(model, torch.device("cpu"))
    assert per_row >= 4 * 2 * 64  # at least the likelihood's parameters (2 per pixel) in float32
    monkeypatch.setattr(scoring, "free_memory_bytes", lambda device: 40 * per_row * 4)  # 25%: 40 rows
    k, how = scoring.samples_per_pass(model, torch.device("cpu"), 5, 1000, "auto")
    assert k == 8 and "40 decoder rows" in how and "GiB free on cpu" in how
    monkeypatch.setattr(scoring, "free_memory_bytes", lambda device: 1)
    assert scoring.samples_per_pass(model, torch.device("cpu"), 5, 1000, "auto")[0] == 1
    assert scoring.samples_per_pass(model, torch.device("cpu"), 5, 1000, 64)[0] == 64


def test_the_cost_is_projected_and_an_hour_is_warned_about(monkeypatch, capsys):
    clock = iter([0.0, 40.0])
    monkeypatch.setattr(scoring.time, "perf_counter", lambda: next(clock))
    report = scoring.CostReport(total=1000, label="worker 1/2", num_workers=2, num_samples=1000)
    report(100, 100 * 1001)  # 100 images in 40 s: 400 s for 1,000
    report.close()
    out = capsys.readouterr().out
    assert "NLL (worker 1/2): projected 6m40s for 1,000 images at K=1000" in out and "warning" not in out
    clock = iter([0.0, 40.0])
    report = scoring.CostReport(total=10_500, label="", num_workers=1, num_samples=1000)
    report(100, 100 * 1001)  # 4,200 s: just over the hour
    report.close()
    out = capsys.readouterr().out
    assert "projected 1h10m" in out
    assert "warning" in out and "evaluate.num_importance_samples" in out
    assert "evaluate.num_workers (now 1)" in out
