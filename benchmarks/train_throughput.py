"""Training throughput: ganpipe's training step against a minimal hand-written PyTorch loop with
the same networks, batch size and precision.

    python -m benchmarks.train_throughput                                   # CPU: DCGAN 32x32, batch 64
    python -m benchmarks.train_throughput --resolution 64 --batch-size 128 \
        --precision bf16 --channels-last --compile                          # GPU: ganpipe's fast path vs plain fp32
    python -m benchmarks.train_throughput --family r3gan --data-path device prefetch sync --json
    python -m benchmarks.train_throughput --family mlp --batch-size 256 --width 128   # vectors (25 Gaussians)

ganpipe's side is `Trainer.iteration()`, the body of the real loop: real batches through the data
path (ganpipe.batches: `--data-path device` keeps the dataset on the GPU, `prefetch` gathers the
next batches from the memory map in a background thread, `sync` gathers each in the step; on CPU
`device` is not chosen and runs as `prefetch`), the discriminator and generator updates through
Accelerate, the EMA update and the divergence bookkeeping. Both sides train with the
non-saturating loss and no penalties, whatever the family, so they do the same work. The plain
loop draws batches from an in-memory tensor, uses Adam, and nothing else. Prints images/s (real
images per second) and the ratio; `--json` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import torch

from ganpipe.config_files import load_config
from ganpipe.launch import prepared_run
from ganpipe.losses import d_logistic, g_non_saturating
from ganpipe.networks import build_discriminator, build_generator, to_network_space
from ganpipe.trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ganpipe(trainer: Trainer, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        trainer.iteration()
    _sync(trainer.device)
    started = time.perf_counter()
    for _ in range(steps):
        trainer.iteration()
    trainer.first_bad_step.item()  # the loop checks this at log steps; include one sync
    _sync(trainer.device)
    return steps * trainer.cfg.train.batch_size / (time.perf_counter() - started)


def time_plain(trainer: Trainer, steps: int, warmup: int, precision: str) -> float:
    """The same networks, trained the way a short hand-written script would."""
    device, spec, batch = trainer.device, trainer.spec, trainer.cfg.train.batch_size
    torch.manual_seed(0)
    G, D = build_generator(spec).to(device), build_discriminator(spec).to(device)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    raw, _ = trainer.data.load_all()
    images = to_network_space(torch.from_numpy(raw), spec).to(device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def step() -> None:
        real = images[torch.randint(len(images), (batch,), device=device)]
        z = torch.randn(batch, spec.latent_dim, device=device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            with torch.no_grad():
                fake = G(z)
            loss_d = d_logistic(D(real).float(), D(fake).float())
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        D.requires_grad_(False)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss_g = g_non_saturating(D(G(torch.randn(batch, spec.latent_dim, device=device))).float())
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        D.requires_grad_(True)

    for _ in range(warmup):
        step()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps * batch / (time.perf_counter() - started)


DATA_PATHS = {"device": ["train.prefetch=2", "train.data_on_device_fraction=0.25"],
              "prefetch": ["train.prefetch=2", "train.data_on_device_fraction=0"],
              "sync": ["train.prefetch=0", "train.data_on_device_fraction=0"]}


# The config each family starts from: images from the digits, the MLP on 2-D vectors (25 Gaussians).
BASE_CONFIGS = {"dcgan": "configs/digits-dcgan.yaml", "resnet": "configs/digits-dcgan.yaml",
                "r3gan": "configs/digits-dcgan.yaml", "mlp": "configs/gaussians-mlp.yaml"}


def overrides(args: argparse.Namespace, data_path: str) -> list[str]:
    shape = [] if args.family == "mlp" else [f"data.resolution={args.resolution}"]
    return [*shape, f"train.batch_size={args.batch_size}", f"model.family={args.family}",
            f"model.g_width={args.width}", f"model.d_width={args.width}", "model.latent_dim=100",
            "train.loss=non_saturating", "train.r1_gamma=0", "train.lr_decay=none",
            f"train.mixed_precision={args.precision}",
            f"train.channels_last={str(args.channels_last).lower()}", f"train.compile={str(args.compile).lower()}",
            *DATA_PATHS[data_path]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=list(BASE_CONFIGS), default="dcgan")
    parser.add_argument("--resolution", type=int, default=32, help="image families only (the MLP trains on 2-D vectors)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--width", type=int, default=64, help="base channels of G and D (model.g_width/d_width)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no", help="ganpipe's precision")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--data-path", nargs="+", choices=list(DATA_PATHS), default=["prefetch"],
                        help="ganpipe's data path(s), each timed (default: prefetch)")
    parser.add_argument("--no-plain", action="store_true", help="time ganpipe only")
    parser.add_argument("--repeats", type=int, default=3, help="alternate the loops this many times")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object, last")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as home:
        os.environ["GANPIPE_HOME"] = home
        trainers: dict[str, Trainer] = {}
        for data_path in args.data_path:
            cfg = load_config(BASE_CONFIGS[args.family], [*overrides(args, data_path),
                                                            f"train.run_name=throughput-{data_path}"])
            with prepared_run(cfg) as prepared:  # a temporary home: no other writer after it
                trainers[data_path] = Trainer(cfg, prepared.run_dir)
        first = next(iter(trainers.values()))
        # The baseline stays plain fp32 on the GPU (the goal); on CPU it matches ganpipe's precision.
        plain_precision = "no" if first.device.type == "cuda" else args.precision
        shape = "2-D vectors" if args.family == "mlp" else f"{args.resolution}x{args.resolution}"
        print(f"device {first.device}, threads {torch.get_num_threads()}, {args.family} {shape}, "
              f"width {args.width}, batch {args.batch_size}; ganpipe precision "
              f"{args.precision}{', channels_last' if args.channels_last else ''}"
              f"{', compile' if args.compile else ''}; plain loop precision {plain_precision}", flush=True)
        ours: dict[str, list[float]] = {name: [] for name in trainers}
        plain: list[float] = []
        for _ in range(args.repeats):
            for name, trainer in trainers.items():
                ours[name].append(time_ganpipe(trainer, args.steps, args.warmup))
            if not args.no_plain:
                plain.append(time_plain(copy.copy(first), args.steps, args.warmup, plain_precision))
        figures = {"family": args.family, "resolution": None if args.family == "mlp" else args.resolution, "batch_size": args.batch_size,
                   "width": args.width, "precision": args.precision, "channels_last": args.channels_last,
                   "compile": args.compile, "device": str(first.device), "plain_precision": plain_precision,
                   "plain_images_per_s": max(plain) if plain else None, "ganpipe": {}}
        for name, trainer in trainers.items():
            best = max(ours[name])
            ratio = best / max(plain) if plain else None
            figures["ganpipe"][name] = {"images_per_s": best, "mode": trainer.batches.mode, "ratio_to_plain": ratio}
            print(f"ganpipe ({name}, runs as {trainer.batches.mode}): {best:8.1f} images/s  "
                  f"(runs: {', '.join(f'{v:.1f}' for v in ours[name])})"
                  + (f"  ratio ganpipe/plain: {ratio:.3f}" if ratio else ""))
            trainer.close()
        if plain:
            print(f"plain:   {max(plain):8.1f} images/s  (runs: {', '.join(f'{v:.1f}' for v in plain)})")
        if args.json:
            print(json.dumps(figures))


if __name__ == "__main__":
    main()
