"""ganpipe's networks: the families of generators and discriminators, the spec that rebuilds
them, sampling, and the map between data units and network space.

This package depends on torch and numpy alone and imports only itself (relatively): registered
MLflow models ship it as their code (`ganpipe_generator.networks`), so a generator loads wherever
`mlflow`, `torch` and `safetensors` are installed. A `NetworkSpec` (plain JSON) is everything
needed to rebuild a network around its saved weights; module attribute names are the state_dict
keys of saved weights, so they do not change.

A family is one module with a generator and a discriminator class, each built from a
`NetworkSpec`; `FAMILIES` is the one place that maps a spec's `family` to them. `check_spec`
raises the ValueError a builder would, without building (the recipe checks a run's spec with it).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .dcgan import DCGANDiscriminator, DCGANGenerator
from .layers import condition_strengths, set_condition_strength
from .mlp import MLPDiscriminator, MLPGenerator
from .r3gan import R3GANDiscriminator, R3GANGenerator
from .r3gan import check as check_r3gan
from .resnet import ResNetDiscriminator, ResNetGenerator
from .resnet import check as check_resnet
from .sampling import generate, latents_for_seeds, pad_rows
from .space import from_network_space, images_to_network_space, to_network_space, vectors_to_network_space
from .spec import NetworkSpec
from .srgan import SRDiscriminator, SRResNetGenerator
from .srgan import check as check_srgan

FAMILIES: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "dcgan": (DCGANGenerator, DCGANDiscriminator),
    "mlp": (MLPGenerator, MLPDiscriminator),
    "resnet": (ResNetGenerator, ResNetDiscriminator),
    "r3gan": (R3GANGenerator, R3GANDiscriminator),
    "srgan": (SRResNetGenerator, SRDiscriminator),  # image-to-image: NetworkSpec.image_to_image
}
# What a family checks in a spec before building (its constructors make the same checks).
FAMILY_CHECKS: dict[str, Callable[[NetworkSpec], None]] = {"resnet": check_resnet, "r3gan": check_r3gan,
                                                            "srgan": check_srgan}


def _family(spec: NetworkSpec) -> tuple[type[nn.Module], type[nn.Module]]:
    try:
        return FAMILIES[spec.family]
    except KeyError:
        raise ValueError(f"unknown network family {spec.family!r} (known: {', '.join(sorted(FAMILIES))})") from None


def check_spec(spec: NetworkSpec) -> None:
    """The spec's family, resolution and family-specific sizes, as a ValueError whose message
    starts with the config key at fault (e.g. `data.resolution: ...`)."""
    _family(spec)
    if spec.family in FAMILY_CHECKS:
        FAMILY_CHECKS[spec.family](spec)


def build_generator(spec: NetworkSpec) -> nn.Module:
    return _family(spec)[0](spec)


def build_discriminator(spec: NetworkSpec) -> nn.Module:
    return _family(spec)[1](spec)


__all__ = [
    "FAMILIES", "DCGANDiscriminator", "DCGANGenerator", "MLPDiscriminator", "MLPGenerator", "NetworkSpec",
    "R3GANDiscriminator", "R3GANGenerator", "ResNetDiscriminator", "ResNetGenerator", "SRDiscriminator", "SRResNetGenerator", "build_discriminator",
    "build_generator", "check_spec", "from_network_space", "generate", "images_to_network_space",
    "latents_for_seeds", "pad_rows", "condition_strengths", "set_condition_strength", "to_network_space", "vectors_to_network_space",
]
