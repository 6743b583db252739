"""Fixed feature networks whose weights the user supplies: VGG19 for the super-resolution feature
loss (`train.vgg_weights`) and LPIPS's AlexNet or VGG16 (`eval.lpips_weights`).

ganpipe never downloads them. The networks are built with the module indices of the layouts users
save (torchvision's `features`, the `lpips` package's slices), so a file saved from those
libraries loads as it is. A file is read tensors-only (safetensors, or torch.load with
weights_only) and its layout checked before use: a missing key or a wrong shape is bad input
naming the config key, the file and the tensor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ganpipe.errors import UserError

Tensor = torch.Tensor


def vgg_features(layout: Sequence[int | str], upto: int | None = None) -> nn.Sequential:
    """A VGG `features` stack (3x3 convolutions of the widths in `layout`, "M" for 2x2 max
    pooling) with torchvision's module indices, truncated after module `upto` (None: whole)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in layout:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=True)]
            channels = int(item)
    return nn.Sequential(*(layers if upto is None else layers[:upto + 1]))


def read_state(path: Path, key: str) -> dict[str, Tensor]:
    """A weights file's tensors: safetensors, or a torch.save file read weights-only."""
    if not path.is_file():
        raise UserError(f"{key} {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input, named
        raise UserError(f"{key} {path}: not a weights file ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})"
                        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise UserError(f"{key} {path}: not a state dict of tensors")
    return state


def checked_state(state: Mapping[str, Tensor], wanted: Mapping[str, Tensor], key: str, path: Path,
                  what: str) -> dict[str, Tensor]:
    """The tensors of `state` named in `wanted`, as float32, once every one is there with the
    wanted shape; else bad input naming the first missing or misshapen tensor. Other tensors of
    the file (a classifier, the lpips package's duplicate `lins.*`) are ignored."""
    missing = [name for name in wanted if name not in state]
    wrong = [name for name in wanted if name in state and state[name].shape != wanted[name].shape]
    if missing or wrong:
        problem = f"missing {missing[0]}" if not wrong else \
            f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}, expected {tuple(wanted[wrong[0]].shape)}"
        raise UserError(f"{key} {path}: not {what} ({problem})")
    return {name: state[name].float() for name in wanted}
