"""Quality bar: the MLP GAN on the 25-Gaussians grid recovers all 25 modes with at least 90% of
samples within 3 std of a mode, in each of 3 seeds (exit 1 otherwise).

    python -m benchmarks.quality_gaussians                    # configs/gaussians-mlp.yaml, seeds 0 1 2
    python -m benchmarks.quality_gaussians --baseline         # also the plain minimax setup, to compare
    python -m benchmarks.quality_gaussians --relativistic     # the bar for RpGAN + R1 + R2 (R3GAN's objective)

Each seed trains through `ganpipe train` (a few minutes on a CPU) and is judged on 2,500 samples
of its EMA generator.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks._common import ROOT, ganpipe
from ganpipe.data.gaussians import mode_quality
from ganpipe.generators import load_generator
from ganpipe.networks import generate

BASELINE = ["train.loss=minimax", "train.r1_gamma=0", "train.g_lr=0.0002", "train.d_lr=0.0002",
            "train.betas=[0.5, 0.999]"]
# The relativistic pairing loss with R1 on real and R2 on generated samples, as R3GAN trains,
# on the same MLP, optimiser and schedule as the default.
RELATIVISTIC = ["train.loss=relativistic", "train.r1_gamma=0.1", "train.r2_gamma=0.1"]


def judge(run_dir: str, num_samples: int = 2500) -> dict:
    loaded = load_generator(run_dir)
    samples = generate(loaded.generator, loaded.spec, list(range(10**6, 10**6 + num_samples)))
    return mode_quality(samples.numpy())


def run(config: str, seeds: list[int], overrides: list[str], label: str, home: Path) -> bool:
    passed = True
    for seed in seeds:
        sets = [a for o in [f"seed={seed}", *overrides] for a in ("--set", o)]
        started = time.time()
        result = ganpipe("train", config, *sets, home=home)
        quality = judge(result["run_dir"])
        ok = quality["modes_recovered"] == 25 and quality["high_quality_fraction"] >= 0.90
        passed &= ok
        print(f"{label:9s} seed {seed}: {quality['modes_recovered']:2d}/25 modes, "
              f"{100 * quality['high_quality_fraction']:.1f}% high quality, "
              f"{time.time() - started:.0f} s  {'PASS' if ok else 'FAIL'}", flush=True)
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/gaussians-mlp.yaml"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--baseline", action="store_true", help="also train the plain minimax setup")
    parser.add_argument("--relativistic", action="store_true",
                        help="hold the bar with train.loss: relativistic + R1 + R2 instead of the config's loss")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as home:
        overrides, label = ([*RELATIVISTIC, *args.overrides], "rpgan") if args.relativistic else \
            (args.overrides, "default")
        passed = run(args.config, args.seeds, overrides, label, Path(home))
        if args.baseline:
            run(args.config, args.seeds, [*args.overrides, *BASELINE], "minimax", Path(home))
    print("quality bar:", "PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
