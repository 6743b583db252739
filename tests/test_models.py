"""Networks: shapes for every supported size, conditioning, spectral norm, packing, and seeded sampling."""

from __future__ import annotations

import pytest
import torch

from ganpipe.networks import (
    NetworkSpec,
    build_discriminator,
    build_generator,
    generate,
    latents_for_seeds,
)


@pytest.mark.parametrize("resolution", [16, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
def test_dcgan_shapes(resolution: int, channels: int) -> None:
    spec = NetworkSpec("dcgan", (channels, resolution, resolution), latent_dim=8, g_width=4, d_width=4)
    G, D = build_generator(spec), build_discriminator(spec)
    images = G(torch.randn(3, 8))
    assert images.shape == (3, channels, resolution, resolution)
    assert images.abs().max() <= 1.0  # tanh output, the data's [-1, 1] range
    assert D(images).shape == (3,)
    # Transposed convolutions up, strided convolutions down.
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in G.modules())
    assert any(isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2) for m in D.modules())


def test_dcgan_rejects_non_power_of_two() -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        build_generator(NetworkSpec("dcgan", (1, 24, 24), latent_dim=8))


@pytest.mark.parametrize("g_conditioning", ["embedding", "cbn"])
@pytest.mark.parametrize("d_conditioning", ["projection", "concat"])
@pytest.mark.parametrize("family", ["dcgan", "mlp"])
def test_conditional_networks_use_the_label(family: str, g_conditioning: str, d_conditioning: str) -> None:
    torch.manual_seed(0)
    shape = (1, 16, 16) if family == "dcgan" else (5,)
    spec = NetworkSpec(family, shape, latent_dim=8, num_classes=4, g_width=8, d_width=8,
                       g_conditioning=g_conditioning, d_conditioning=d_conditioning)
    G, D = build_generator(spec).eval(), build_discriminator(spec).eval()
    with torch.no_grad():  # conditional BN starts class-independent (gain 1, bias 0): move off it, as training does
        for p in G.parameters():
            p.add_(0.1 * torch.randn_like(p))
    z = torch.randn(2, 8).repeat(2, 1)
    labels = torch.tensor([0, 0, 3, 3])
    out = G(z, labels)
    assert out.shape == (4, *shape)
    assert not torch.allclose(out[0], out[2])  # same latent, other class: another sample
    x = out.detach()[:1].repeat(2, *([1] * len(shape)))
    with torch.no_grad():
        scores = D(x, torch.tensor([0, 3]))
    assert scores[0] != scores[1]  # same input, other class: another score


def test_spectral_norm_bounds_the_discriminator_layers() -> None:
    spec = NetworkSpec("mlp", (4,), latent_dim=2, d_width=16, spectral_norm=True, d_norm="none")
    D = build_discriminator(spec)
    for _ in range(20):  # power iterations converge during training-mode forwards
        D(torch.randn(8, 4))
    for module in D.modules():
        if isinstance(module, torch.nn.Linear):
            assert torch.linalg.matrix_norm(module.weight, ord=2) <= 1.05


def test_packing_judges_groups_of_samples() -> None:
    spec = NetworkSpec("mlp", (2,), latent_dim=2, d_width=8, pack=4)
    assert build_discriminator(spec)(torch.randn(12, 2)).shape == (3,)
    with pytest.raises(ValueError, match="divisible"):
        build_discriminator(spec)(torch.randn(10, 2))


def test_latents_depend_only_on_their_seed() -> None:
    together = latents_for_seeds([5, 6, 7], 16)
    alone = latents_for_seeds([7], 16)
    assert torch.equal(together[2], alone[0])
    assert not torch.equal(together[0], together[1])
    truncated = latents_for_seeds([5, 6, 7], 16, truncation=0.5)
    assert truncated.abs().max() <= 0.5
    assert torch.equal(truncated, latents_for_seeds([5, 6, 7], 16, truncation=0.5))


def test_generate_outputs_user_units() -> None:
    spec = NetworkSpec("dcgan", (3, 16, 16), latent_dim=8, g_width=4)
    images = generate(build_generator(spec).eval(), spec, [1, 2, 3])
    assert images.dtype == torch.uint8 and images.shape == (3, 16, 16, 3)
    vector_spec = NetworkSpec("mlp", (2,), latent_dim=4, g_width=8, mean=(10.0, -5.0), std=(2.0, 0.5))
    G = build_generator(vector_spec).eval()
    raw = G(latents_for_seeds([1], 4))
    out = generate(G, vector_spec, [1])
    assert torch.allclose(out, raw * torch.tensor([2.0, 0.5]) + torch.tensor([10.0, -5.0]), atol=1e-5)
