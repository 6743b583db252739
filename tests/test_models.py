"""Networks: shapes for every supported size, conditioning, spectral norm, packing, seeded sampling,\nthe map between data units and network space, and the package's independence from the rest of ganpipe."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ganpipe import networks
from ganpipe.networks import (
    FAMILIES,
    NetworkSpec,
    build_discriminator,
    build_generator,
    from_network_space,
    generate,
    latents_for_seeds,
    to_network_space,
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


# One small spec per family: a family added to FAMILIES needs one here too.
FAMILY_EXAMPLES = {
    "dcgan": NetworkSpec("dcgan", (3, 16, 16), latent_dim=8, num_classes=3, g_width=4, d_width=4),
    "mlp": NetworkSpec("mlp", (5,), latent_dim=4, g_width=8, d_width=8),
    "resnet": NetworkSpec("resnet", (3, 32, 32), latent_dim=8, num_classes=3, g_width=4, d_width=4),
    "r3gan": NetworkSpec("r3gan", (1, 16, 16), latent_dim=8, g_width=4, d_width=4, r3gan_blocks=1),
    "srgan": NetworkSpec("srgan", (3, 16, 16), latent_dim=0, g_width=4, d_width=4, scale=2, sr_blocks=1),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_builds_through_the_one_builder(family: str) -> None:
    spec = FAMILY_EXAMPLES[family]
    generator_class, discriminator_class = FAMILIES[family]
    G, D = build_generator(spec), build_discriminator(spec)
    assert type(G) is generator_class and type(D) is discriminator_class
    labels = torch.arange(4) % spec.num_classes if spec.conditional else None
    inputs = torch.rand(4, *spec.input_shape(*spec.sample_shape[1:])) if spec.image_to_image else torch.randn(4, spec.latent_dim)
    samples = G(inputs, labels)
    assert samples.shape == (4, *spec.sample_shape) and D(samples, labels).shape == (4,)
    assert set(FAMILY_EXAMPLES) == set(FAMILIES)


def test_unknown_family_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown network family 'nope'"):
        build_generator(NetworkSpec("nope", (2,), latent_dim=2))


def test_network_package_imports_only_itself_torch_and_numpy() -> None:
    """Registered models ship ganpipe/networks as their code: it must load without ganpipe."""
    package = Path(networks.__file__).parent
    sources = sorted(package.glob("*.py"))
    assert len(sources) > 2
    for source in sources:
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1, f"{source.name}: imports from outside the package"
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                root = name.split(".")[0]
                assert root in {"torch", "numpy", "__future__"} or root in sys.stdlib_module_names, \
                    f"{source.name} imports {name}"


def test_network_space_round_trips() -> None:
    images = torch.randint(0, 256, (3, 8, 8, 2), dtype=torch.uint8)
    image_spec = NetworkSpec("dcgan", (2, 8, 8), latent_dim=2)
    x = to_network_space(images, image_spec)
    assert x.dtype == torch.float32 and x.shape == (3, 2, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(from_network_space(x, image_spec), images)
    vector_spec = NetworkSpec("mlp", (2,), latent_dim=2, mean=(10.0, -5.0), std=(2.0, 0.5))
    vectors = torch.tensor([[10.0, -5.0], [12.0, -4.5]])
    assert torch.equal(to_network_space(vectors, vector_spec), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert torch.allclose(from_network_space(to_network_space(vectors, vector_spec), vector_spec), vectors)
    # Training reads numpy rows: the same bits as the float32 numpy arithmetic it replaced.
    rows = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 2), dtype=np.uint8)
    expected = rows.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    assert np.array_equal(to_network_space(torch.from_numpy(rows), image_spec).numpy(), expected)
