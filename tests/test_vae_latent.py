"""Latent-space tools: interpolation, traversal, attribute vectors (White 2016) and active units
(Burda et al. 2016). Exact comparisons in float32 to 1e-6 unless stated."""

from __future__ import annotations

import math

import pytest
import torch

from vae.latent import (
    apply_attribute_vector,
    attribute_vector,
    interpolate,
    interpolate_images,
    reconstruct,
    sample_prior,
    traverse,
)
from vae.model import VAE
from vae.objectives import active_units

LATENT_DIM = 5
IMAGE_SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def model() -> VAE:
    torch.manual_seed(0)
    return VAE("mlp", IMAGE_SHAPE, latent_dim=LATENT_DIM, hidden_dims=[16], likelihood="bernoulli").eval()


@pytest.fixture(scope="module")
def conv_model() -> VAE:
    """Batch norm: the tools must be used in eval mode, where encoding does not depend on the batch."""
    torch.manual_seed(0)
    return VAE(
        "conv", IMAGE_SHAPE, latent_dim=LATENT_DIM, hidden_dims=[4, 8], likelihood="gaussian_fixed"
    ).eval()


def _images(num_images: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (num_images, *IMAGE_SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def _codes(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(LATENT_DIM, generator=generator), torch.randn(LATENT_DIM, generator=generator)


# ---------------------------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize("method", ["linear", "spherical"])
def test_interpolation_endpoints_are_the_inputs(method):
    a, b = _codes()
    path = interpolate(a, b, 7, method)
    assert path.shape == (7, LATENT_DIM)
    torch.testing.assert_close(path[0], a, rtol=0, atol=1e-6)
    torch.testing.assert_close(path[-1], b, rtol=0, atol=1e-6)


def test_linear_midpoint():
    a, b = _codes()
    torch.testing.assert_close(interpolate(a, b, 3, "linear")[1], (a + b) / 2)
    torch.testing.assert_close(interpolate(a, b, 5, "linear")[1], 0.75 * a + 0.25 * b)


def test_slerp_keeps_the_norm_of_equal_norm_endpoints_and_the_angle_uniform():
    a, b = _codes(1)
    b = b * (a.norm() / b.norm())
    path = interpolate(a, b, 9, "spherical")
    torch.testing.assert_close(path.norm(dim=1), a.norm().expand(9), rtol=1e-6, atol=1e-6)
    # constant angular speed: consecutive points are equally far apart on the great circle
    cosines = torch.nn.functional.cosine_similarity(path[:-1], path[1:], dim=1)
    torch.testing.assert_close(cosines, cosines[0].expand(8), rtol=0, atol=1e-6)
    omega = torch.arccos(torch.dot(a, b) / (a.norm() * b.norm()))
    torch.testing.assert_close(torch.arccos(cosines[0].clamp(max=1.0)), omega / 8, rtol=1e-3, atol=1e-5)
    # the linear midpoint is shorter (White 2016)
    assert interpolate(a, b, 3, "linear")[1].norm() < path[4].norm()


def test_slerp_of_parallel_and_antiparallel_codes_is_finite():
    a, _ = _codes(2)
    torch.testing.assert_close(interpolate(a, 2 * a, 3, "spherical")[1], 1.5 * a)
    path = interpolate(a, -a, 5, "spherical")
    assert torch.isfinite(path).all()
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], -a)
    torch.testing.assert_close(path[2], torch.zeros_like(a))  # degenerates to lerp through the origin


def test_interpolation_rejects_bad_arguments():
    a, b = _codes()
    with pytest.raises(ValueError, match="num_steps"):
        interpolate(a, b, 1)
    with pytest.raises(ValueError, match="linear, spherical"):
        interpolate(a, b, 4, "cubic")


def test_interpolate_images_decodes_the_path_between_posterior_means(model):
    x = _images(2)
    images = interpolate_images(model, x[0], x[1], num_steps=4, method="linear")
    assert images.shape == (4, *IMAGE_SHAPE)
    means = model.encode(x).mean
    torch.testing.assert_close(images[0], model(x[:1])[0])
    torch.testing.assert_close(images[-1], model(x[1:])[0])
    expected = model.likelihood.mean(model.decode(interpolate(means[0], means[1], 4, "linear")))
    torch.testing.assert_close(images, expected)


# ---------------------------------------------------------------------------------------------- traversal


def test_traverse_sets_one_dimension(model):
    z, _ = _codes(3)
    values = torch.tensor([-3.0, 0.0, 1.5, 3.0])
    images = traverse(model, z, dimension=2, values=values)
    assert images.shape == (4, *IMAGE_SHAPE)
    for image, value in zip(images, values, strict=True):
        code = z.clone()
        code[2] = value
        torch.testing.assert_close(image, model.likelihood.mean(model.decode(code.unsqueeze(0)))[0])
    torch.testing.assert_close(z, _codes(3)[0])  # the input code is not modified


def test_traverse_rejects_a_dimension_outside_the_latent_space(model):
    z, _ = _codes()
    for dimension in (-1, LATENT_DIM):
        with pytest.raises(IndexError):
            traverse(model, z, dimension, torch.zeros(2))


def test_reconstruct_and_sample_prior(model):
    x = _images(3)
    torch.testing.assert_close(
        reconstruct(model, x), model.likelihood.mean(model.decode(model.encode(x).mean))
    )
    samples = sample_prior(model, 4, torch.Generator().manual_seed(1))
    z = torch.randn(4, LATENT_DIM, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(samples, model.likelihood.mean(model.decode(z)))


# ---------------------------------------------------------------------------------------------- attributes


@pytest.mark.parametrize("fixture", ["model", "conv_model"])
@pytest.mark.parametrize("batch_size", [3, 4, 256])
def test_attribute_vector_is_the_difference_of_means(fixture, batch_size, request):
    """mean of E_q[z|x] over images with the attribute minus over those without, accumulated across batches
    (batch_size 3 and 4 split the 10 images unevenly, with both labels inside each batch)."""
    model = request.getfixturevalue(fixture)
    x = _images(10, seed=4)
    labels = torch.tensor([1, 0, 0, 1, 1, 0, 1, 0, 0, 0], dtype=torch.bool)
    means = model.encode(x).mean.double()
    expected = means[labels].mean(0) - means[~labels].mean(0)
    vector = attribute_vector(model, x, labels, batch_size=batch_size)
    assert vector.shape == (LATENT_DIM,)
    torch.testing.assert_close(vector, expected.float(), rtol=0, atol=1e-6)
    # 0/1 integer labels work the same
    torch.testing.assert_close(attribute_vector(model, x, labels.long(), batch_size=batch_size), vector)


def test_attribute_vector_needs_both_groups(model):
    x = _images(4)
    for labels in (torch.zeros(4), torch.ones(4)):
        with pytest.raises(ValueError, match="with and without"):
            attribute_vector(model, x, labels)


def test_apply_attribute_vector(model):
    x = _images(3, seed=5)
    vector = torch.randn(LATENT_DIM, generator=torch.Generator().manual_seed(6))
    scales = torch.tensor([0.0, -1.0, 2.5])
    out = apply_attribute_vector(model, x, vector, scales)
    assert out.shape == (3, 3, *IMAGE_SHAPE)
    torch.testing.assert_close(out[:, 0], reconstruct(model, x))  # scale 0 is the reconstruction
    means = model.encode(x).mean
    for j, scale in enumerate(scales):
        torch.testing.assert_close(out[:, j], model.likelihood.mean(model.decode(means + scale * vector)))


# ---------------------------------------------------------------------------------------------- active units


def test_active_units_counts_dimensions_with_posterior_mean_variance_above_threshold():
    """Columns with known unbiased variances: +-a alternating over N = 100 images has variance a^2 N / (N -
    1)."""
    n = 100
    signs = torch.tensor([1.0, -1.0]).repeat(n // 2)
    amplitudes = torch.tensor(
        [1.0, 0.2, 0.0999, 0.05, 0.0, 3.0]
    )  # variances ~1, 0.0404, 0.01008, 0.0025, 0, 9
    means = signs.unsqueeze(1) * amplitudes + 7.0  # a constant offset changes nothing
    count, variance = active_units(means)
    expected = amplitudes.double().pow(2) * n / (n - 1)
    torch.testing.assert_close(variance, expected.float(), rtol=1e-5, atol=1e-9)
    assert count == 4  # 1, 0.0404, 0.01008 and 9 exceed 0.01; 0.0025 and 0 do not
    assert active_units(means, threshold=0.05)[0] == 2
    assert active_units(means, threshold=math.inf)[0] == 0


def test_active_units_of_a_model_with_a_dead_dimension(model):
    """Zeroing a latent dimension's encoder row makes its posterior mean the same for every image (inactive);
    shrinking a row by 1e-3 makes its variance ~1e-8 (inactive); rows scaled up by 10 have variances ~1-2."""
    dead = VAE("mlp", IMAGE_SHAPE, latent_dim=LATENT_DIM, hidden_dims=[16], likelihood="bernoulli").eval()
    dead.load_state_dict(model.state_dict())
    with torch.no_grad():
        head = dead.encoder.net[-1]
        head.weight[:LATENT_DIM].mul_(10.0)
        head.weight[1].zero_()
        head.bias[1] = 0.3
        head.weight[3].mul_(1e-4)
        means = dead.encode(_images(200, seed=7)).mean
    count, variance = active_units(means)
    assert variance[1] == 0.0 and variance[3] < 1e-4
    assert (variance[[0, 2, 4]] > 0.5).all()
    assert count == LATENT_DIM - 2
