"""Every architecture gives the right shapes for (1, 28, 28), (3, 32, 32), (3, 64, 64) and (3, 128, 128),
and the default convolutional net is the common CelebA-64 form. Small widths keep the shape sweep fast; the
depth (five stride-2 blocks for the conv nets) is the real one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vae.likelihoods import LIKELIHOODS
from vae.model import VAE
from vae.networks import ARCHITECTURES, ResidualBlock, make_networks

IMAGE_SHAPES = [(1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 128, 128)]
SMALL_HIDDEN = {"mlp": [32], "conv": [4, 4, 8, 8, 8], "resnet": [4, 4, 8, 8, 8]}
LATENT_DIM = 6
BATCH = 2


def _images(shape, batch=BATCH, seed=0):
    return torch.randint(
        0, 256, (batch, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


@pytest.mark.parametrize("image_shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_shapes(architecture, image_shape):
    torch.manual_seed(0)
    model = VAE(
        architecture,
        image_shape,
        latent_dim=LATENT_DIM,
        hidden_dims=SMALL_HIDDEN[architecture],
        likelihood="discretized_logistic",
    )
    x = _images(image_shape)
    channels, height, width = image_shape
    posterior = model.encode(x)
    assert posterior.mean.shape == (BATCH, LATENT_DIM) and posterior.log_variance.shape == (BATCH, LATENT_DIM)
    assert posterior.mean.dtype == torch.float32
    params = model.decode(torch.randn(3, LATENT_DIM))
    assert params.shape == (3, 2 * channels, height, width)  # discretized logistic: (mu, log s) per channel
    reconstruction = model(x)
    assert reconstruction.shape == (BATCH, channels, height, width)
    assert reconstruction.min() >= 0.0 and reconstruction.max() <= 1.0
    samples = model.sample(5, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (5, channels, height, width) and samples.min() >= 0 and samples.max() <= 1
    terms = model.elbo_terms(x, num_samples=2)
    assert terms.reconstruction.shape == (BATCH,) and terms.kl_per_dim.shape == (BATCH, LATENT_DIM)
    assert torch.isfinite(terms.negative_elbo()).all()


@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_decoder_outputs_the_likelihoods_parameter_channels(likelihood):
    model = VAE("conv", (3, 32, 32), latent_dim=4, hidden_dims=[4, 8], likelihood=likelihood)
    params = model.decode(torch.randn(2, 4))
    assert params.shape == (2, model.likelihood.param_channels(3), 32, 32)
    assert model(_images((3, 32, 32))).shape == (2, 3, 32, 32)


def test_mlp_with_no_hidden_layers_is_linear():
    encoder, decoder = make_networks("mlp", (1, 4, 4), [], 3, 1)
    assert [type(m) for m in encoder.net] == [nn.Flatten, nn.Linear]
    assert [type(m) for m in decoder.net] == [nn.Linear]
    assert encoder.net[1].weight.shape == (6, 16) and decoder.net[0].weight.shape == (16, 3)


def test_default_conv_is_the_celeba64_form():
    """Five stride-2 3x3 conv + batch norm blocks 32-64-128-256-512 (64 -> 2x2), a mirrored decoder of five
    stride-2 transposed convs, no Tanh at the output."""
    model = VAE()  # conv, (3, 64, 64), latent 128, hidden (32, 64, 128, 256, 512), discretized logistic
    convs = [m for m in model.encoder.modules() if isinstance(m, nn.Conv2d)]
    assert [m.stride for m in convs] == [(2, 2)] * 5
    assert [m.out_channels for m in convs] == [32, 64, 128, 256, 512]
    assert [m.kernel_size for m in convs] == [(3, 3)] * 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.encoder.modules()) == 5
    assert model.encoder.final_size == 2 and model.encoder.head.in_features == 512 * 2 * 2
    transposed = [m for m in model.decoder.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [m.stride for m in transposed] == [(2, 2)] * 5
    assert [m.in_channels for m in transposed] == [512, 256, 128, 64, 32]
    assert not any(isinstance(m, nn.Tanh) for m in model.modules())
    model.eval()
    x = _images((3, 64, 64))
    assert model.encode(x).mean.shape == (2, 128)
    assert model.decode(torch.randn(2, 128)).shape == (2, 6, 64, 64)
    assert model(x).shape == (2, 3, 64, 64)


def test_default_conv_adapts_to_other_sizes():
    """28x28 is padded to 32 (five blocks to 1x1) and 128 gives 4x4 before the linear head."""
    encoder, decoder = make_networks("conv", (1, 28, 28), [32, 64, 128, 256, 512], 16, 1)
    assert encoder.padded_size == 32 and encoder.final_size == 1 and decoder.start_size == 1
    encoder, decoder = make_networks("conv", (3, 128, 128), [32, 64, 128, 256, 512], 16, 6)
    assert encoder.final_size == 4 and decoder.start_size == 4 and encoder.pad == 0


def test_resnet_adds_residual_blocks():
    encoder, decoder = make_networks("resnet", (3, 32, 32), [4, 8], 3, 6)
    assert sum(isinstance(m, ResidualBlock) for m in encoder.modules()) == 2
    assert sum(isinstance(m, ResidualBlock) for m in decoder.modules()) == 2
    plain, _ = make_networks("conv", (3, 32, 32), [4, 8], 3, 6)
    assert not any(isinstance(m, ResidualBlock) for m in plain.modules())


def test_padding_and_cropping_keep_the_image_aligned():
    """With 28x28 inputs the encoder's zero padding must be symmetric and the decoder's crop the same
    window."""
    encoder, decoder = make_networks("conv", (1, 28, 28), [4, 4], 2, 1)
    assert (encoder.padded_size, encoder.pad) == (28, 0)  # 28 is a multiple of 4: no padding
    encoder, decoder = make_networks("conv", (1, 28, 28), [4, 4, 4], 2, 1)
    assert (encoder.padded_size, encoder.pad) == (32, 2) and (decoder.padded_size, decoder.pad) == (32, 2)


def test_model_roundtrips_through_its_config():
    model = VAE("resnet", (3, 32, 32), latent_dim=5, hidden_dims=[4, 8], likelihood="categorical_256")
    clone = VAE.from_config(model.config)
    clone.load_state_dict(model.state_dict())
    model.eval(), clone.eval()
    x = _images((3, 32, 32))
    torch.testing.assert_close(clone(x), model(x))
    assert model.num_dims == 3 * 32 * 32


def test_encoder_does_not_modify_a_float_input():
    model = VAE("mlp", (1, 4, 4), latent_dim=2, hidden_dims=[8])
    x = torch.full((2, 1, 4, 4), 255.0)
    model.encode(x)
    assert (x == 255.0).all()
    torch.testing.assert_close(model.encode(x).mean, model.encode(x.to(torch.uint8)).mean)


def test_unknown_architecture_lists_the_allowed_names():
    with pytest.raises(ValueError, match="model.architecture") as error:
        VAE("transformer", (1, 28, 28), hidden_dims=[8])
    for name in ("mlp", "conv", "resnet"):
        assert name in str(error.value)


def test_unknown_likelihood_lists_the_allowed_names():
    with pytest.raises(ValueError, match="model.likelihood") as error:
        VAE("mlp", (1, 28, 28), hidden_dims=[8], likelihood="poisson")
    for name in LIKELIHOODS:
        assert name in str(error.value)
