"""Quality bar: the conditional DCGAN on digits (configs/digits-cgan.yaml) makes the digit it is
asked for. Samples of each class are recognised as that class by an SVM trained on the real
digits at least 90% of the time (exit 1 otherwise).

    python -m benchmarks.quality_digits_cgan [--samples-per-class 200] [--set train.steps=3000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._common import ROOT, ganpipe
from ganpipe.data.digits import recognition_rates
from ganpipe.generators import load_generator
from ganpipe.networks import generate


def judge(run_dir: str, per_class: int) -> dict[int, float]:
    loaded = load_generator(run_dir)
    labels = np.repeat(np.arange(loaded.spec.num_classes), per_class)
    images = generate(loaded.generator, loaded.spec, list(range(len(labels))), labels.tolist()).numpy()
    return recognition_rates(images, labels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs/digits-cgan.yaml"))
    parser.add_argument("--samples-per-class", type=int, default=200)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        started = time.time()
        result = ganpipe("train", args.config, *[a for o in args.overrides for a in ("--set", o)], home=Path(home))
        rates = judge(result["run_dir"], args.samples_per_class)
    print(f"trained {result['steps']} steps in {time.time() - started:.0f} s")
    for digit, rate in rates.items():
        print(f"digit {digit}: {100 * rate:.1f}% recognised")
    worst = min(rates.values())
    print(f"worst class {100 * worst:.1f}% -> quality bar {'PASS' if worst >= 0.9 else 'FAIL'}")
    return 0 if worst >= 0.9 else 1


if __name__ == "__main__":
    raise SystemExit(main())
