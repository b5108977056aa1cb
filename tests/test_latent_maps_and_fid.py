"""Latent maps (the decoded 2-D manifold, the scatter of posterior means) and FID: the Frechet distance
against closed forms, the feature statistics, the cache of the test split's statistics, the missing-weights
path and the weights' sha256 check."""

from __future__ import annotations

import hashlib
import io
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import fid, latent_maps
from pipeline.common import StageError
from pipeline.params_file import load_params
from tests.fixtures.features import stand_in
from vae.model import VAE


# ------------------------------------------------------------------------------------------------ latent maps
def test_manifold_grid_decodes_the_inverse_normal_cdf_grid():
    torch.manual_seed(0)
    model = VAE("mlp", (1, 6, 6), 2, [16], "bernoulli").eval()
    grid = latent_maps.manifold_grid(model, 5, torch.device("cpu"))
    assert grid.shape == (25, 1, 6, 6)
    normal = torch.distributions.Normal(0.0, 1.0)
    low, high = float(normal.icdf(torch.tensor(0.1))), float(normal.icdf(torch.tensor(0.9)))
    with torch.no_grad():
        corners = model.likelihood.mean(model.decode(torch.tensor([[low, high], [high, high], [low, low]])))
    np.testing.assert_allclose(grid[0], corners[0].numpy(), atol=1e-6)  # top left: z1 low, z2 high
    np.testing.assert_allclose(grid[4], corners[1].numpy(), atol=1e-6)  # top right
    np.testing.assert_allclose(grid[20], corners[2].numpy(), atol=1e-6)  # bottom left
    with torch.no_grad():
        centre = model.likelihood.mean(model.decode(torch.zeros(1, 2)))
    np.testing.assert_allclose(grid[12], centre[0].numpy(), atol=1e-6)  # u = 0.5 -> z = 0
    with pytest.raises(StageError, match="latent_dim == 2"):
        latent_maps.manifold_grid(VAE("mlp", (1, 6, 6), 3, [16], "bernoulli"), 5, torch.device("cpu"))


def test_scatter_uses_the_two_most_active_dimensions():
    rng = np.random.default_rng(0)
    means = rng.normal(size=(300, 6)) * np.array([0.1, 3.0, 0.01, 1.0, 0.2, 0.05])
    assert latent_maps.most_active_dims(means) == (1, 3)
    labels = rng.integers(0, 3, 300)
    png = latent_maps.scatter_png(means, labels, ["a", "b", "c"], "test")
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (640, 560)
    with pytest.raises(StageError, match="299 labels for 300"):
        latent_maps.scatter_png(means, labels[:-1], ["a", "b", "c"], "test")
    with pytest.raises(StageError, match="at least 2 latent dimensions"):
        latent_maps.scatter_png(means[:, :1], labels, ["a", "b", "c"], "test")


# ------------------------------------------------------------------------------------------------------- FID
def stats(mean, covariance):
    return fid.Statistics(np.asarray(mean, float), np.asarray(covariance, float), 100)


def test_frechet_distance_of_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    same = stats(a.mean(0), np.cov(a, rowvar=False))
    assert fid.frechet_distance(same, same) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_the_closed_form_of_two_gaussians():
    """For S_a = c I: Tr((S_a S_b)^1/2) = sqrt(c) sum sqrt(eig(S_b)); for diagonal ones the distance is
    ||mu_a - mu_b||^2 + sum (sigma_a - sigma_b)^2 (Dowson & Landau 1982)."""
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    eigenvalues = np.array([4.0, 1.0, 0.25, 2.0, 9.0])
    s_b = rotation @ np.diag(eigenvalues) @ rotation.T
    mu_a, mu_b = rng.normal(size=5), rng.normal(size=5)
    expected = ((mu_a - mu_b) ** 2).sum() + 5 * 3.0 + eigenvalues.sum() - 2 * np.sqrt(3.0) * np.sqrt(
        eigenvalues).sum()
    assert fid.frechet_distance(stats(mu_a, 3.0 * np.eye(5)), stats(mu_b, s_b)) == pytest.approx(expected)
    sigma_a, sigma_b = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.5])
    diagonal = fid.frechet_distance(
        stats([0, 0, 1], np.diag(sigma_a**2)), stats([1, 0, 1], np.diag(sigma_b**2))
    )
    assert diagonal == pytest.approx(1.0 + ((sigma_a - sigma_b) ** 2).sum())


def test_feature_statistics_are_the_mean_and_covariance_of_the_features():
    images = np.random.default_rng(2).integers(0, 256, (37, 1, 12, 12), dtype=np.uint8)
    net = stand_in()
    got = fid.feature_statistics(net, iter([images[:10], images[10:]]))
    features = net.extract(fid.as_rgb_uint8(images)).numpy()
    assert got.count == 37
    np.testing.assert_allclose(got.mean, features.mean(0), rtol=1e-10)
    np.testing.assert_allclose(got.covariance, np.cov(features, rowvar=False), rtol=1e-8, atol=1e-12)
    with pytest.raises(StageError, match="at least 2 images"):
        fid.feature_statistics(net, iter([images[:1]]))


def test_grey_and_float_images_become_rgb_uint8_and_other_channels_are_refused():
    grey = torch.arange(4, dtype=torch.uint8).view(1, 1, 2, 2)
    rgb = fid.as_rgb_uint8(grey)
    assert rgb.shape == (1, 3, 2, 2) and torch.equal(rgb[:, 2], grey[:, 0])
    assert fid.as_rgb_uint8(torch.full((1, 3, 2, 2), 0.5)).unique().tolist() == [128]
    with pytest.raises(StageError, match="1 or 3"):
        fid.as_rgb_uint8(torch.zeros(1, 2, 4, 4, dtype=torch.uint8))


def test_reference_statistics_are_computed_once_per_split_and_extractor(tmp_path, monkeypatch):
    monkeypatch.setenv("VAE_PROJECT_ROOT", str(tmp_path))
    images = np.random.default_rng(3).integers(0, 256, (40, 3, 8, 8), dtype=np.uint8)
    calls = []
    real = fid.feature_statistics
    monkeypatch.setattr(fid, "feature_statistics", lambda net, batches: calls.append(1) or real(net, batches))
    first = fid.reference_statistics(stand_in(), images, "ab" * 32, batch_size=16)
    again = fid.reference_statistics(stand_in(), images, "ab" * 32, batch_size=16)
    assert len(calls) == 1 and list((tmp_path / ".cache/fid").glob("*.npz"))
    np.testing.assert_array_equal(first.covariance, again.covariance)
    fid.reference_statistics(stand_in(), images, "cd" * 32, batch_size=16)  # other data: computed again
    assert len(calls) == 2
    fewer = fid.reference_statistics(stand_in(), images[:24], "ab" * 32, batch_size=16)  # evaluate.max_images
    assert len(calls) == 3 and fewer.count == 24  # the first 24 images are other statistics, not the cache's


def test_missing_inception_weights_fail_fast_with_the_file_the_url_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with socket.socket() as probe:  # a port nothing listens on: the download is refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}/{fid.INCEPTION_FILE}"
    monkeypatch.setattr(fid, "INCEPTION_URL", url)
    with pytest.raises(StageError) as raised:
        fid.load_inception(torch.device("cpu"))
    message = str(raised.value)
    assert fid.INCEPTION_FILE in message and url in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and "evaluate.fid: auto" in message


def test_inception_weights_with_the_wrong_sha256_are_refused_and_not_kept(tmp_path, monkeypatch, http_server):
    """A URL (or a proxy) serving another file than the genuine weights: the download is refused and nothing
    stays in torch hub's checkpoint folder, so torch-fidelity never unpickles it."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    served = b"not the Inception weights: a pickle that runs code"
    http_server.add(f"/{fid.INCEPTION_FILE}", served)
    url = f"{http_server.url}/{fid.INCEPTION_FILE}"
    monkeypatch.setattr(fid, "INCEPTION_URL", url)
    with pytest.raises(StageError, match="are not the genuine file") as raised:
        fid.load_inception(torch.device("cpu"))
    assert url in str(raised.value) and fid.INCEPTION_SHA256 in str(raised.value)
    assert http_server.requests_for(f"/{fid.INCEPTION_FILE}")  # it was downloaded, then refused
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    assert not checkpoints.exists() or not list(checkpoints.iterdir())

    # The genuine file (here: the served bytes, their digest made the expected one) is kept and loaded.
    import torch_fidelity.feature_extractor_inceptionv3 as extractor

    loaded = []

    def extractor_stand_in(*args, feature_extractor_weights_path):
        loaded.append(feature_extractor_weights_path)
        return torch.nn.Identity()

    monkeypatch.setattr(fid, "INCEPTION_SHA256", hashlib.sha256(served).hexdigest())
    monkeypatch.setattr(extractor, "FeatureExtractorInceptionV3", extractor_stand_in)
    fid.load_inception(torch.device("cpu"))
    assert loaded == [str(checkpoints / fid.INCEPTION_FILE)]


def test_a_cached_inception_file_with_the_wrong_sha256_is_refused_naming_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    planted = fid.inception_weights_path()
    planted.parent.mkdir(parents=True)
    planted.write_bytes(b"a substituted or damaged weights file")
    with pytest.raises(StageError, match="not the genuine weights, and was not loaded. Delete it") as raised:
        fid.load_inception(torch.device("cpu"))
    assert str(planted) in str(raised.value) and fid.INCEPTION_URL in str(raised.value)


def test_fid_auto_skips_and_says_why_while_fid_true_fails(tmp_path, monkeypatch):
    from pipeline.evaluate import fid_figures

    def missing(device):
        raise StageError(f"FID needs the Inception-v3 weights {fid.INCEPTION_FILE} ...")

    monkeypatch.setattr(fid, "load_inception", missing)
    images = np.zeros((4, 1, 8, 8), np.uint8)
    model = VAE("mlp", (1, 8, 8), 2, [8], "bernoulli")
    cpu = torch.device("cpu")
    auto = fid_figures(load_params(overrides={"evaluate.fid": "auto"}), model, images, "00", cpu)
    assert fid.INCEPTION_FILE in auto["fid_skipped"] and "fid_samples" not in auto
    with pytest.raises(StageError, match=fid.INCEPTION_FILE):
        fid_figures(load_params(overrides={"evaluate.fid": True}), model, images, "00", cpu)
    off = fid_figures(load_params(overrides={"evaluate.fid": False}), model, images, "00", cpu)
    assert off == {"fid_skipped": "evaluate.fid is false"}


def test_scatter_colours_follow_the_dataset_and_refuse_what_it_lacks(monkeypatch, tmp_path):
    from pipeline import evaluate
    from pipeline.data import Split

    faces = Split(np.zeros((3, 3, 4, 4), np.uint8), np.array([[1, 0], [0, 0], [1, 1]], np.uint8),
                  ["Smiling", "Eyeglasses"], name="test", dataset="celeba")
    monkeypatch.setattr(evaluate, "load_split", lambda folder, split: faces)
    celeba = {"data.dataset": "celeba"}
    colours, names, _ = evaluate.scatter_classes(load_params(overrides=celeba), tmp_path, 3)
    assert colours.tolist() == [1, 0, 1] and names == ["not Smiling", "Smiling"]  # auto: Smiling
    glasses = load_params(overrides={**celeba, "evaluate.latent_scatter": "Eyeglasses"})
    assert evaluate.scatter_classes(glasses, tmp_path, 3)[0].tolist() == [0, 0, 1]
    for choice, error in (("label", "has no class labels"), ("Beard", "'Beard' is not an attribute")):
        with pytest.raises(StageError, match=error):
            asked = load_params(overrides={**celeba, "evaluate.latent_scatter": choice})
            evaluate.scatter_classes(asked, tmp_path, 3)
    clothes = Split(np.zeros((2, 1, 4, 4), np.uint8), labels=np.array([9, 0], np.uint8), name="test")
    monkeypatch.setattr(evaluate, "load_split", lambda folder, split: clothes)
    colours, names, _ = evaluate.scatter_classes(load_params(overrides={"data.dataset": "fashion_mnist"}),
                                                 tmp_path, 2)
    assert colours.tolist() == [9, 0] and names[9] == "Ankle boot"
    none = load_params(overrides={"evaluate.latent_scatter": "none"})
    assert evaluate.scatter_classes(none, tmp_path, 2) is None
