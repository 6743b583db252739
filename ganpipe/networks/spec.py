"""NetworkSpec: everything needed to rebuild a network around its saved weights, as plain JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SR_FIELDS = ("scale", "sr_blocks", "sr_batch_norm")


@dataclass(frozen=True)
class NetworkSpec:
    family: str  # a key of ganpipe.networks.FAMILIES: mlp | dcgan | resnet | r3gan | srgan
    sample_shape: tuple[int, ...]  # (C, H, W) for images, (D,) for vectors
    latent_dim: int
    num_classes: int = 0  # 0: unconditional
    g_width: int = 64
    d_width: int = 64
    mlp_layers: int = 3
    g_conditioning: str = "embedding"  # embedding | cbn
    d_conditioning: str = "projection"  # projection | concat
    spectral_norm: bool = False
    d_norm: str = "batch"  # batch | none
    pack: int = 1
    # Fields added later default to what specs written before them built, so old spec.json files load.
    attention_resolution: int = 0  # resnet: self-attention at this feature-map size (0: none)
    r3gan_expansion: int = 2  # r3gan: inverted bottleneck's expansion factor
    r3gan_group_size: int = 16  # r3gan: channels per group of the grouped 3x3 convolution
    r3gan_blocks: int = 2  # r3gan: residual blocks per resolution
    scale: int = 1  # srgan: the upscaling factor (1: every other family, which generates from latents)
    sr_blocks: int = 16  # srgan: residual blocks of the generator
    sr_batch_norm: bool = False  # srgan: batch norm in the generator's residual blocks
    sr_input_skip: str = "none"  # srgan: none | bicubic (the output is a residual over the upscaled input)
    # For vector data: the statistics that map the generator's standardised output back to data units.
    mean: tuple[float, ...] = field(default_factory=tuple)
    std: tuple[float, ...] = field(default_factory=tuple)
    columns: tuple[str, ...] = field(default_factory=tuple)
    classes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_image(self) -> bool:
        return len(self.sample_shape) == 3

    @property
    def image_to_image(self) -> bool:
        """The generator maps an image (`scale` times smaller than sample_shape) to an image,
        rather than a latent to a sample: sampling from noise does not apply to it."""
        return self.scale > 1

    def input_shape(self, height: int, width: int) -> tuple[int, ...]:
        """An image-to-image generator's input for an output of height x width."""
        return (self.sample_shape[0], height // self.scale, width // self.scale)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def to_json(self) -> dict[str, Any]:
        """The spec as plain JSON. A field added after the first format is left out while it holds
        its default (the super-resolution ones: unless the family is srgan): a spec that does not
        use it is byte-for-byte what older versions wrote, so its sha256, the export marker that
        embeds it and old registered versions all still match (tests/test_compat.py). Such a
        field's default therefore never changes."""
        kept = set(SR_FIELDS) if self.image_to_image else set()
        return {k: v for k, v in asdict(self).items()
                if k in kept or not (k in LATER_FIELDS and v == LATER_FIELDS[k])}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NetworkSpec:
        """The spec in a spec.json (lists back to tuples). A key this version does not know is an
        error, not ignored: weights are never rebuilt around a shape they were not trained for."""
        tuples = {"sample_shape", "mean", "std", "columns", "classes"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


# Fields added to NetworkSpec after its first format, with their defaults (see to_json).
LATER_FIELDS: dict[str, Any] = {"attention_resolution": 0, "r3gan_expansion": 2, "r3gan_group_size": 16,
                                "r3gan_blocks": 2, "scale": 1, "sr_blocks": 16, "sr_batch_norm": False,
                                "sr_input_skip": "none"}
