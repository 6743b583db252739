"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"), version 0.1, in torch alone: the `lpips` package's numbers without the package.

Two images in [-1, 1] are shifted and scaled per channel (the v0.1 scaling layer), passed through
a backbone (AlexNet, or VGG16), and at each of its five ReLU outputs the features are divided by
their norm over channels; the squared difference of the two images' unit features is weighted by
a learned 1x1 convolution (one output), averaged over positions, and the five layers summed.
0 for equal images; lower is closer.

The weights are the `lpips` package's state dict, saved once by the user (README, Evaluation):
`torch.save(lpips.LPIPS(net='alex').state_dict(), 'lpips-alex.pth')`, or a safetensors file of the
same tensors. The backbone is read from the file's layout (the shape of its first convolution),
so no other setting names it. Nothing is downloaded and nothing unpickled.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ganpipe.feature_networks import checked_state, read_state, vgg_features
from ganpipe.metrics.sr import ImageTooSmall
from ganpipe.networks import images_to_network_space

Tensor = torch.Tensor
KEY = "eval.lpips_weights"
# v0.1's scaling layer: ImageNet statistics expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # the package's normalize_tensor: x / (norm + eps)
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
# Per backbone: the module index ending each of the five slices (the package's `net.sliceK` hold
# the modules from the previous cut to this one), the channels of each slice's output, and the
# shape of the first convolution, which tells the backbones' files apart.
BACKBONES: dict[str, dict[str, tuple[int, ...]]] = {
    "alex": {"cuts": (2, 5, 8, 10, 12), "channels": (64, 192, 384, 256, 256), "first": (64, 3, 11, 11)},
    "vgg": {"cuts": (4, 9, 16, 23, 30), "channels": (64, 128, 256, 512, 512), "first": (64, 3, 3, 3)},
}
# Smallest image side each backbone takes: AlexNet's stride-4 11x11 convolution and two 3x3/2 max
# poolings before relu3 leave nothing of a smaller image; VGG16 pools four times before relu5_3.
MIN_SIZE = {"alex": 31, "vgg": 16}
LPIPS_HOWTO = (f"{KEY} is not set. Save the lpips package's weights once where you have it: python -c \"import "
               "torch, lpips; torch.save(lpips.LPIPS(net='alex').state_dict(), 'lpips-alex.pth')\" and set "
               f"{KEY}: lpips-alex.pth")


def alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet `features` up to relu5, with its module indices."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True))


class Backbone(nn.Module):
    """Five slices of a features stack named as the package names them (`slice1.0.weight`...),
    each returning its last ReLU's output."""

    def __init__(self, name: str):
        super().__init__()
        features = alexnet_features() if name == "alex" else vgg_features(VGG16_LAYOUT)
        start = 0
        for number, stop in enumerate(BACKBONES[name]["cuts"], start=1):
            part = nn.Sequential()
            for index in range(start, stop):
                part.add_module(str(index), features[index])
            self.add_module(f"slice{number}", part)
            start = stop

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for number in range(1, 6):
            x = getattr(self, f"slice{number}")(x)
            outputs.append(x)
        return outputs


class LinearLayer(nn.Module):
    """The learned per-channel weights of one layer: a 1x1 convolution to one channel, at index 1
    of `model` as in the package (whose index 0 is a dropout, the identity when evaluating)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Identity(), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def unit_features(x: Tensor) -> Tensor:
    """Features divided by their norm over channels at every position (the package's normalize_tensor)."""
    return x / (torch.sqrt(torch.sum(x**2, dim=1, keepdim=True)) + EPS)


class LPIPS(nn.Module):
    """The distance: `model(a, b)` of N x 3 x H x W images in [-1, 1] gives N distances.
    Frozen, in evaluation mode; built with `load_lpips`."""

    def __init__(self, backbone: str):
        super().__init__()
        self.backbone = backbone
        self.net = Backbone(backbone)
        for index, channels in enumerate(BACKBONES[backbone]["channels"]):
            self.add_module(f"lin{index}", LinearLayer(channels))
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        features_a = self.net((a - self.shift) / self.scale)
        features_b = self.net((b - self.shift) / self.scale)
        total = torch.zeros(len(a), device=a.device)
        for index, (fa, fb) in enumerate(zip(features_a, features_b, strict=True)):
            difference = (unit_features(fa) - unit_features(fb)) ** 2
            total = total + getattr(self, f"lin{index}")(difference).mean(dim=(2, 3)).flatten()
        return total


def load_lpips(path: Path, device: torch.device | str = "cpu", key: str = KEY) -> LPIPS:
    """The distance with the weights of `path` (the `lpips` package's state dict, alex or vgg,
    told apart by the first convolution's shape); a file of another layout is bad input naming
    `key`, the file and the tensor."""
    state = read_state(path, key)
    first = state.get("net.slice1.0.weight")
    backbone = next((name for name, b in BACKBONES.items() if first is not None and tuple(first.shape) == b["first"]),
                    "alex")  # an unknown first layer is then reported against AlexNet's layout
    model = LPIPS(backbone).requires_grad_(False).eval()
    wanted = model.state_dict()
    model.load_state_dict(checked_state(state, wanted, key, path, "LPIPS weights in the lpips package's layout "
                                        "(lpips.LPIPS(net='alex' or 'vgg').state_dict())"))
    return model.to(device)


class LPIPSMeasure:
    """LPIPS of uint8 H x W x C images, as ganpipe.metrics.sr measures psnr and ssim: `scale`
    pixels of border cropped (the pixels psnr and ssim see), on RGB (a greyscale image is
    repeated to three channels)."""

    def __init__(self, model: LPIPS, device: torch.device | str = "cpu"):
        self.model, self.device = model, device

    def __call__(self, a: np.ndarray, b: np.ndarray, border: int = 0, y_channel: bool = False) -> float:
        """`y_channel` does not apply (LPIPS is defined on RGB); taken to share psnr's signature.
        An image too small for the backbone is ImageTooSmall (as for ssim), saying the least size."""
        least, (height, width) = MIN_SIZE[self.model.backbone], a.shape[:2]
        if min(height, width) - 2 * border < least:
            raise ImageTooSmall(f"LPIPS with the {self.model.backbone} backbone needs images of at least {least}x{least} "
                             f"px after the {border} px border crop, got {width}x{height}")
        pair = np.stack([a, b])[:, border:a.shape[0] - border, border:a.shape[1] - border]
        x = images_to_network_space(torch.from_numpy(np.ascontiguousarray(pair))).to(self.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return float(self.model(x[:1], x[1:])[0])
