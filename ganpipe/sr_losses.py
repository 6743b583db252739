"""Super-resolution losses: pixel (L1 or MSE), feature (distances of VGG19's conv5_4 features,
before its ReLU, as ESRGAN) and the adversarial objectives (standard, and ESRGAN's relativistic
average). The VGG19 weights come from a file the user supplies (`train.vgg_weights`,
torchvision's layout; ganpipe.feature_networks reads it): nothing is downloaded, nothing unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ganpipe.feature_networks import checked_state, read_state, vgg_features

Tensor = torch.Tensor
# torchvision's vgg19 `features`: convolutions (3x3, these widths) and "M" (2x2 max pooling).
VGG19_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
CONV5_4 = 34  # index of conv5_4 in `features`: the layer whose (pre-activation) output is compared
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG_HOWTO = ("train.vgg_weights is not set: training with the pixel loss alone. For the feature (perceptual) loss, "
             "save torchvision's VGG19 weights once where you have the network: python -c \"import torch, "
             "torchvision; torch.save(torchvision.models.vgg19(weights='IMAGENET1K_V1').state_dict(), "
             "'vgg19.pth')\" and set train.vgg_weights: vgg19.pth")


def vgg19_features(upto: int = len(VGG19_LAYOUT) + 16) -> nn.Sequential:
    """VGG19's `features` with torchvision's module indices (so its state_dict keys are
    torchvision's), truncated after module `upto`."""
    return vgg_features(VGG19_LAYOUT, upto)


class VGGFeatureLoss(nn.Module):
    """L1 distance between VGG19 conv5_4 features (before the ReLU) of two images in [-1, 1].
    Frozen; greyscale images are repeated to three channels."""

    def __init__(self, path: Path, key: str = "train.vgg_weights"):
        super().__init__()
        self.features = vgg19_features(CONV5_4).requires_grad_(False).eval()
        wanted = {f"features.{name}": tensor for name, tensor in self.features.state_dict().items()}
        state = checked_state(read_state(path, key), wanted, key, path, "VGG19 weights in torchvision's layout")
        self.features.load_state_dict({name.removeprefix("features."): tensor for name, tensor in state.items()})
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def _embed(self, x: Tensor) -> Tensor:
        x = (x + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.features((x - self.mean) / self.std)

    def forward(self, output: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            target_features = self._embed(target)
        return F.l1_loss(self._embed(output), target_features)


def pixel_loss(kind: str, output: Tensor, target: Tensor) -> Tensor:
    return F.l1_loss(output, target) if kind == "l1" else F.mse_loss(output, target)


def d_adversarial(kind: str, real: Tensor, fake: Tensor) -> Tensor:
    """The discriminator's loss. standard: -log D(x) - log(1 - D(G(x_lr))). relativistic_average
    (ESRGAN): real logits judged against the fakes' mean, and fakes against the reals' mean."""
    if kind == "standard":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    return 0.5 * (F.softplus(-(real - fake.mean())).mean() + F.softplus(fake - real.mean()).mean())


def g_adversarial(kind: str, fake: Tensor, real: Tensor) -> Tensor:
    """The generator's adversarial term (non-saturating; relativistic average mirrors D's). The
    real logits are taken without a graph: a constant bar for G."""
    if kind == "standard":
        return F.softplus(-fake).mean()
    return 0.5 * (F.softplus(real - fake.mean()).mean() + F.softplus(-(fake - real.mean())).mean())
