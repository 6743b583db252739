"""The one map between data units and network space, both ways.

Data units: uint8 NHWC images, or float vectors in the data's own scale. Network space: float32
NCHW images in [-1, 1] (the generator's tanh range), or standardised vectors. Training feeds the
discriminator through `to_network_space`, and the export's discriminator gate and the fd_domain
metric use the same function, so a sample is judged exactly as the training data was;
`from_network_space` is its inverse for generated samples (rounded and clamped to uint8 images).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .spec import NetworkSpec


def images_to_network_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [-1, 1]. The result is a permuted view's copy, so its memory
    stays NHWC (channels_last strides), as the data was stored."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def vectors_to_network_space(vectors: torch.Tensor, mean: Sequence[float] | torch.Tensor,
                             std: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Data-unit vectors -> standardised float32, with the data's float32 per-column statistics."""
    # Non-blocking: a blocking copy to a GPU would wait for all its queued work (a training step's).
    mean = torch.as_tensor(mean, dtype=torch.float32).to(vectors.device, non_blocking=True)
    std = torch.as_tensor(std, dtype=torch.float32).to(vectors.device, non_blocking=True)
    return (vectors.float() - mean) / std


def to_network_space(samples: torch.Tensor, spec: NetworkSpec) -> torch.Tensor:
    """Data units -> what the networks see (training data, samples to score)."""
    if spec.is_image:
        return images_to_network_space(samples)
    if spec.mean:
        return vectors_to_network_space(samples, spec.mean, spec.std)
    return samples.float()


def from_network_space(samples: torch.Tensor, spec: NetworkSpec, on_device: bool = False) -> torch.Tensor:
    """Network output -> data units: uint8 NHWC images, or float32 vectors in the data's own scale.
    By default on the CPU; with `on_device` images stay where they were generated (evaluation feeds
    them straight to a feature network there: quantising is element-wise, so the bytes are the
    same). Vectors are always rescaled on the CPU, so they are the same whichever device
    generated them."""
    samples = samples.float()
    if spec.is_image:
        images = ((samples + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return images if on_device else images.cpu()
    samples = samples.cpu()
    if spec.mean:
        samples = samples * torch.tensor(spec.std, dtype=torch.float32) + torch.tensor(spec.mean, dtype=torch.float32)
    return samples
