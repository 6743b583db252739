"""ganpipe's networks: the families of generators and discriminators, the spec that rebuilds
them, sampling, and the map between data units and network space.

This package depends on torch and numpy alone and imports only itself (relatively): registered
MLflow models ship it as their code (`ganpipe_generator.networks`), so a generator loads wherever
`mlflow`, `torch` and `safetensors` are installed. A `NetworkSpec` (plain JSON) is everything
needed to rebuild a network around its saved weights; module attribute names are the state_dict
keys of saved weights, so they do not change.

A family is one module with a generator and a discriminator class, each built from a
`NetworkSpec`; `FAMILIES` is the one place that maps a spec's `family` to them.
"""

from __future__ import annotations

from torch import nn

from .dcgan import DCGANDiscriminator, DCGANGenerator
from .mlp import MLPDiscriminator, MLPGenerator
from .sampling import generate, latents_for_seeds, pad_rows
from .space import from_network_space, images_to_network_space, to_network_space, vectors_to_network_space
from .spec import NetworkSpec

FAMILIES: dict[str, tuple[type[nn.Module], type[nn.Module]]] = {
    "dcgan": (DCGANGenerator, DCGANDiscriminator),
    "mlp": (MLPGenerator, MLPDiscriminator),
}


def _family(spec: NetworkSpec) -> tuple[type[nn.Module], type[nn.Module]]:
    try:
        return FAMILIES[spec.family]
    except KeyError:
        raise ValueError(f"unknown network family {spec.family!r} (known: {', '.join(sorted(FAMILIES))})") from None


def build_generator(spec: NetworkSpec) -> nn.Module:
    return _family(spec)[0](spec)


def build_discriminator(spec: NetworkSpec) -> nn.Module:
    return _family(spec)[1](spec)


__all__ = [
    "FAMILIES", "DCGANDiscriminator", "DCGANGenerator", "MLPDiscriminator", "MLPGenerator", "NetworkSpec",
    "build_discriminator", "build_generator", "from_network_space", "generate", "images_to_network_space",
    "latents_for_seeds", "pad_rows", "to_network_space", "vectors_to_network_space",
]
