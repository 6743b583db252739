"""Memory a network and a batch need, known before anything is allocated.

Networks are built on torch's meta device, which records shapes and allocates nothing. That gives
the parameter shapes a spec implies (checked against a weights file's header before the file is
loaded), the bytes of weights and Adam state, and the activations of one sample (one forward pass
on meta tensors, adding up the outputs of every layer). A request whose estimate exceeds the memory
available is refused with a UserError (exit 2) before a worker starts or a tensor is allocated: a
typo in a batch size or a width costs one error line, not the machine.

The estimates leave out what does not grow with the request (the framework itself, allocator
slack, kernel workspaces) and count activations at the precision they are kept in, so they err
low: what fits is never refused, and what is refused was far from fitting.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from ganpipe.config import Config
from ganpipe.errors import UserError
from ganpipe.networks import NetworkSpec, build_discriminator, build_generator

GIB = 1 << 30
MAX_MLP_LAYERS = 1000  # a meta build is cheap per layer, not free: 10**6 layers would take minutes
GENERATE_BATCH = 256  # rows per forward pass of networks.generate, which generate and export use


def meta_network(spec: NetworkSpec, which: str = "generator") -> nn.Module:
    """The generator or discriminator `spec` describes, on the meta device: shapes, no memory.
    Raises ValueError, TypeError, RuntimeError or OverflowError for a spec nothing can be built from."""
    if spec.family == "mlp" and isinstance(spec.mlp_layers, int) and spec.mlp_layers > MAX_MLP_LAYERS:
        raise ValueError(f"mlp_layers {spec.mlp_layers}: at most {MAX_MLP_LAYERS}")
    build = build_generator if which == "generator" else build_discriminator
    with torch.device("meta"):
        return build(spec)


def state_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the module's state_dict: what its weights file must hold."""
    return {name: tuple(value.shape) for name, value in module.state_dict().items()}


def parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def buffer_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


@dataclass(frozen=True)
class Activations:
    """Bytes of layer outputs per sample: all of them (kept for a backward pass), and the largest
    (what a no-grad forward pass holds at once, with its input)."""

    total: int
    largest: int


def layers(module: nn.Module) -> list[nn.Module]:
    """The modules that compute: those without sub-modules, and those whose only sub-modules are
    parametrizations of their weights (spectral norm), which are not layers themselves."""
    found = []
    for name, sub in module.named_modules():
        if "parametrizations" in name.split("."):
            continue
        children = [child for child_name, child in sub.named_children() if child_name != "parametrizations"]
        if not children:
            found.append(sub)
    return found


def activations_per_sample(module: nn.Module, inputs: Callable[[int], tuple], samples: int) -> Activations:
    """One forward pass of `samples` samples on meta tensors (`inputs(samples)` builds them), with
    hooks adding up the outputs of every layer; divided by `samples`."""
    sizes: list[int] = []

    def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
        for tensor in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(tensor, torch.Tensor):
                sizes.append(tensor.numel() * tensor.element_size())

    handles = [layer.register_forward_hook(hook) for layer in layers(module)]
    try:
        with torch.no_grad():
            module.eval()(*inputs(samples))
    finally:
        for handle in handles:
            handle.remove()
    return Activations(sum(sizes) // samples, max(sizes, default=0) // samples)


def generator_inputs(spec: NetworkSpec) -> Callable[[int], tuple]:
    def make(n: int) -> tuple:
        labels = torch.zeros(n, dtype=torch.long, device="meta") if spec.conditional else None
        if spec.image_to_image:  # a low-resolution image of the training crop
            return torch.empty(n, *spec.input_shape(*spec.sample_shape[1:]), device="meta"), labels
        return torch.empty(n, spec.latent_dim, device="meta"), labels
    return make


def discriminator_inputs(spec: NetworkSpec) -> Callable[[int], tuple]:
    def make(n: int) -> tuple:
        labels = torch.zeros(n, dtype=torch.long, device="meta") if spec.conditional else None
        return torch.empty(n, *spec.sample_shape, device="meta"), labels
    return make


def gib(size: float) -> str:
    """Bytes as GiB for messages: two decimals when small, thousands separators when huge."""
    value = size / GIB
    return f"{value:,.2f}" if value < 10 else f"{value:,.0f}"


# --- available memory ------------------------------------------------------------------------------

def available_ram() -> int:
    """Memory the host can give without swapping (MemAvailable)."""
    return int(psutil.virtual_memory().available)


def available_gpu_memory() -> int | None:
    """The least free memory of the visible GPUs, from nvidia-smi: asking torch would create a
    CUDA context in the launcher, which would hold GPU memory for as long as training runs. None
    when it cannot be known (no nvidia-smi): then nothing is refused."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.free", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    free = {}
    for line in out.splitlines():
        index, _, mib = line.partition(",")
        if index.strip().isdigit() and mib.strip().isdigit():
            free[index.strip()] = int(mib) << 20
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    chosen = [free[d] for d in visible if d in free] or list(free.values())
    return min(chosen) if chosen else None


# --- training ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingFootprint:
    """Bytes one training process needs: `fixed` whatever the batch (weights, gradients, both Adam
    moments, the generator's EMA copy), `per_micro_sample` of activations kept for the backward
    passes, `per_sample` of inputs for every sample of the process's batch."""

    fixed: int
    generator_fixed: int
    discriminator_fixed: int
    per_micro_sample: int
    per_sample: int

    def needed(self, per_process: int, micro: int) -> int:
        return self.fixed + micro * self.per_micro_sample + per_process * self.per_sample


def training_footprint(spec: NetworkSpec, mixed_precision: str = "no") -> TrainingFootprint:
    """What training `spec` costs per process. The discriminator update keeps D's activations for a
    real and a fake batch; the generator update keeps G's and D's: the larger of the two counts."""
    g, d = meta_network(spec, "generator"), meta_network(spec, "discriminator")
    g_fixed = 5 * parameter_bytes(g) + 2 * buffer_bytes(g)  # weights, gradients, 2 Adam moments, EMA
    d_fixed = 4 * parameter_bytes(d) + buffer_bytes(d)
    pack = max(1, spec.pack)
    g_act = activations_per_sample(g, generator_inputs(spec), 2 * pack).total
    d_act = activations_per_sample(d, discriminator_inputs(spec), 2 * pack).total
    if mixed_precision != "no":  # activations in 16 bits under autocast
        g_act, d_act = g_act // 2, d_act // 2
    sample = math.prod(spec.sample_shape)
    per_sample = sample * (1 + 4) + 4 * spec.latent_dim  # the raw record, it in network space, a latent
    return TrainingFootprint(g_fixed + d_fixed, g_fixed, d_fixed, max(2 * d_act, g_act + d_act), per_sample)


def network_culprit(spec: NetworkSpec, footprint: TrainingFootprint) -> str:
    """The config key that makes the networks large: the wider network's width, or the latent
    size when the generator's input layer outweighs the rest of it."""
    if footprint.discriminator_fixed > footprint.generator_fixed:
        return "model.d_width"
    small_latent = parameter_bytes(meta_network(dataclasses.replace(spec, latent_dim=1)))
    whole = parameter_bytes(meta_network(spec))
    return "model.latent_dim" if whole - small_latent > small_latent else "model.g_width"


def check_training_fits(cfg: Config, spec: NetworkSpec) -> None:
    """Refuse (exit 2, naming the key and the estimate) a network or batch that cannot fit in the
    memory of the device it would train on, before any worker starts."""
    t, m = cfg.train, cfg.model
    try:
        footprint = training_footprint(spec, t.mixed_precision)
    except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
        raise UserError(f"model: no network can be built from these settings ({str(exc).splitlines()[0][:200]})") \
            from None
    per_process = max(1, t.batch_size // max(1, t.num_processes))
    micro = max(1, per_process // max(1, t.grad_accum))
    gpu = not t.cpu and torch.cuda.is_available()
    if gpu:
        available, sharing, where = available_gpu_memory(), 1, "free on the GPU"
    else:
        available, where = available_ram(), "of RAM available"
        sharing = max(1, t.num_processes // max(1, t.num_machines))  # processes sharing this host's RAM
    if available is None:
        return
    needed = sharing * footprint.needed(per_process, micro)
    if needed <= available:
        return
    processes = f" x {sharing} processes" if sharing > 1 else ""
    fixed = f"weights, gradients and Adam state {gib(footprint.fixed)} GiB"
    if sharing * footprint.needed(1, 1) > available:  # not even one sample fits: the networks are too large
        key = network_culprit(spec, footprint)
        raise UserError(f"{key} {getattr(m, key.removeprefix('model.'))} needs about {gib(needed)} GiB ({fixed} "
                        f"of networks with model.g_width {m.g_width}, model.d_width {m.d_width}, model.latent_dim "
                        f"{m.latent_dim}{processes}), more than the {gib(available)} GiB {where}")
    batch = (f"activations of {micro:,} samples x {footprint.per_micro_sample:,} bytes, inputs of "
             f"{per_process:,} samples x {footprint.per_sample:,} bytes")
    fits = max(1, (available // sharing - footprint.fixed) // (footprint.per_micro_sample + footprint.per_sample))
    raise UserError(f"train.batch_size {t.batch_size} needs about {gib(needed)} GiB ({fixed}, {batch}{processes}), "
                    f"more than the {gib(available)} GiB {where}; about {fits:,} samples per process would fit")


# --- loading and generating ------------------------------------------------------------------------

def check_generator_fits(g: nn.Module, spec: NetworkSpec, weights_bytes: int, what: str) -> None:
    """Refuse a generator (`g`: its meta_network) whose loading (file bytes, the tensors read from
    them, the network) and a forward pass of networks.generate's batch cannot fit in the RAM
    available. `what` names the file."""
    activations = activations_per_sample(g, generator_inputs(spec), 2)
    needed = 3 * weights_bytes + GENERATE_BATCH * 2 * activations.largest
    available = available_ram()
    if needed > available:
        raise UserError(f"{what}: loading this generator and running it on {GENERATE_BATCH} samples needs about "
                        f"{gib(needed)} GiB ({gib(weights_bytes)} GiB of weights), more than the "
                        f"{gib(available)} GiB of RAM available")
