"""Counting host-device synchronisations on a machine without a GPU.

On CUDA a training step that reads a device tensor back to the host (`.item()`, `bool(t)`,
`.tolist()`, `.cpu()`, indexing with a boolean mask) or copies a host tensor to the device
without `non_blocking=True` waits until the device has finished all its queued work: the
host stops running ahead, and the GPU idles while the host then prepares the next work.
`torch.cuda.set_sync_debug_mode` reports these, on CUDA only. This hook finds the same calls
on the CPU by following where every tensor WOULD live on a GPU run:

- on the host: what a factory function makes without a `device` argument (`torch.rand(...,
  generator=cpu_generator)`, `torch.tensor(...)`, `torch.arange(...)`), `.cpu()`, `.pin_memory()`,
  and whatever an operation computes from host tensors alone;
- on the device: what `.to(device)` / `.cuda()` / a factory with `device=` makes, what an
  operation computes from any device tensor, and every tensor made before the hook was entered
  (the networks' weights, the trainer's state: all placed on the device).

It counts (a) readbacks of device tensors and (b) blocking host-to-device copies, each with
the innermost call site outside torch. Readbacks of host tensors (decisions on parameters drawn
on the CPU, the CPU optimiser's step counters) are no synchronisation on a GPU and are not
counted. `torch.from_numpy` is not seen by the hook (it makes a tensor the hook then takes for
a device one: a readback of it would be over-counted, never missed).
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakTensorKeyDictionary

READBACKS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "__format__", "cpu", "numpy",
             "nonzero", "masked_select", "unique", "argwhere"}
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "randperm", "linspace", "logspace", "eye", "scalar_tensor", "empty_strided", "normal", "bernoulli"}
COPIES_FROM_DATA = {"tensor", "as_tensor"}  # factories that copy their (host) data argument
TORCH_DIR = os.path.dirname(torch.__file__)


class HostSyncCounter(TorchFunctionMode):
    """`with HostSyncCounter() as syncs: ...` then `syncs.events`: a Counter of
    (kind, call name, "file.py:function") for every synchronising call made in the block."""

    def __init__(self) -> None:
        super().__init__()
        self.host = WeakTensorKeyDictionary()  # tensors that would live on the host
        self.events: Counter[tuple[str, str, str]] = Counter()

    def on_host(self, t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t in self.host

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        method = getattr(func, "__qualname__", "").startswith(("TensorBase.", "Tensor."))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        first = args[0] if args else None

        if method and name in READBACKS and isinstance(first, torch.Tensor) and not self.on_host(first):
            self.record("readback", name)
        if not method and name in READBACKS and inputs and not all(map(self.on_host, inputs)):
            self.record("readback", name)  # torch.nonzero(t) and the like
        if method and name in ("__getitem__", "__setitem__") and isinstance(first, torch.Tensor):
            indices = args[1] if isinstance(args[1], tuple) else (args[1],)
            masks = [i for i in indices if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
            if masks and not (self.on_host(first) and all(map(self.on_host, masks))):
                self.record("readback", f"{name}[bool mask]")  # sizes the result: a nonzero() on the device

        target = self.destination(func, name, method, args, kwargs, inputs)
        result = func(*args, **kwargs)
        if name in ("to", "cuda") and result is first and target == "device" and self.on_host(first):
            # On the CPU `.to(device)` is a no-op returning its input: mark an alias as moved, so
            # the input itself stays on the host.
            result = result.view_as(result)
        for out in tree_flatten(result)[0]:
            if isinstance(out, torch.Tensor):
                if target == "host":
                    self.host[out] = True
                elif out in self.host and target == "device":
                    del self.host[out]
        return result

    def destination(self, func, name: str, method: bool, args: tuple, kwargs: dict,  # noqa: ANN001
                    inputs: list[torch.Tensor]) -> str:
        """Where the call's result would live ("host" or "device"), counting a blocking copy
        to the device on the way."""
        first = args[0] if args else None
        non_blocking = bool(kwargs.get("non_blocking")) or any(a is True for a in args[1:])
        if method and name in ("to", "cuda"):
            device = kwargs.get("device")
            for a in args[1:]:
                if isinstance(a, (torch.device, str)) or (isinstance(a, int) and not isinstance(a, bool)):
                    device = a
                elif isinstance(a, torch.Tensor):  # .to(other): other's device
                    device = "host" if self.on_host(a) else "device"
            if name == "cuda":
                device = "device"
            if device is None:  # a dtype or memory-format conversion stays where it is
                return "host" if self.on_host(first) else "device"
            if device == "host":
                return "host"
            if self.on_host(first) and not non_blocking:
                self.record("blocking copy", name)
            return "device"
        if method and name == "copy_":
            if not self.on_host(first) and self.on_host(args[1]) and not non_blocking:
                self.record("blocking copy", name)
            return "host" if self.on_host(first) else "device"
        if method and name in ("cpu", "numpy", "pin_memory"):
            return "host"
        if not method and name in FACTORIES:
            if kwargs.get("device") is None:
                return "host"
            data = args[0] if args else kwargs.get("data")
            if name in COPIES_FROM_DATA and not (isinstance(data, torch.Tensor) and not self.on_host(data)):
                self.record("blocking copy", f"torch.{name}(device=)")
            return "device"
        if not method and name.endswith("_like") and kwargs.get("device") is not None:
            return "device"
        return "host" if inputs and all(map(self.on_host, inputs)) else "device"

    def record(self, kind: str, name: str) -> None:
        self.events[(kind, name, call_site())] += 1


def call_site() -> str:
    """The innermost frame outside torch and this module: where the call was made."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if not path.startswith(TORCH_DIR) and path != __file__:
            return f"{os.path.basename(path)}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"
