"""Augmentation value: does a generator's data help a downstream classifier, and at what mix?

For each config: train it (`ganpipe train`), then measure `uplift` (`ganpipe evaluate --metrics
uplift`) with 30 labelled real digits per class: the real-only accuracy on the held-out real rows,
the accuracy at each ratio of synthetic to real rows, uplift +- its uncertainty, and the metric's
wall time, beside fd_domain (realism, which does not predict usefulness). An unconditional
generator has no labels to augment with: its uplift is reported as unavailable.

    python -m benchmarks.augmentation_value [--config FILE ...] [--per-class 30] [--set KEY=VALUE ...]
        [--eval-set eval.KEY=VALUE ...]
    python -m benchmarks.augmentation_value --quick    # a few seconds: the code paths, not the figures
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks._common import ROOT, ganpipe

DEFAULT_CONFIGS = ["configs/digits-dcgan.yaml", "configs/digits-cgan.yaml", "configs/digits-limited.yaml"]
QUICK = ["train.steps=2", "train.checkpoint_every=2", "train.sample_every=2", "train.best_metric=none",
         "model.g_width=8", "model.d_width=8"]
QUICK_EVAL = ["eval.uplift_repeats=1", "eval.uplift_ratios=[1]", "eval.uplift_cnn_steps=10"]


def measure(config: Path, home: Path, per_class: int, train_sets: list[str], eval_sets: list[str],
            metrics: str) -> dict[str, Any]:
    """Train `config`, then its `metrics` against the config's own data source."""
    before, started = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    trained = ganpipe("train", str(config), *[a for s in train_sets for a in ("--set", s)], home=home)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the command and the workers it waited for
    train_wall_s, train_cpu_s = time.perf_counter() - started, (after.ru_utime + after.ru_stime
                                                                 - before.ru_utime - before.ru_stime)
    source = yaml.safe_load(config.read_text())["data"]["source"]
    started = time.perf_counter()
    results = ganpipe("evaluate", "--real", source, "--fake", trained["run_dir"], "--metrics", metrics,
                      "--set", f"eval.uplift_real_per_class={per_class}",
                      *[a for s in eval_sets for a in ("--set", s)], home=home, check=False)
    failed = {"value": None, "error": "ganpipe evaluate failed (no metric could be computed)"}
    return {"uplift": results.get("uplift", failed), "fd_domain": results.get("fd_domain"),
            "wall_s": time.perf_counter() - started, "train_steps": trained["steps"], "train_wall_s": train_wall_s,
            "train_cpu_s": train_cpu_s}


def report(name: str, measured: dict[str, Any]) -> list[str]:
    result, fd = measured["uplift"], measured["fd_domain"]
    realism = f"fd_domain {fd['value']:.3f} ± {fd['uncertainty']:.3f}" if fd else "fd_domain not measured"
    trained = f"{measured['train_steps']} steps ({measured['train_wall_s']:.0f} s wall, {measured['train_cpu_s']:.0f} CPU s)"
    if result.get("value") is None:
        return [f"{name}: {trained}, {realism}; uplift unavailable ({result.get('error')})"]
    real = result["real_only"]
    lines = [f"{name}: {trained}, {realism}; uplift with {result['num_real']} real rows, "
             f"{result['classifier']} classifier, {result['repeats']} repeat(s), {result['holdout']['num_rows']} "
             "rows held out",
             f"  real only       accuracy {real['mean']:.4f} ± {real['std_error']:.4f}"]
    lines += [f"  ratio {row['ratio']:<8g}  accuracy {row['accuracy_mean']:.4f} ± {row['accuracy_std_error']:.4f}"
              f"  uplift {row['uplift']:+.4f} ± {row['uplift_std_error']:.4f}" for row in result["ratios"]]
    lines.append(f"  uplift {result['value']:+.4f} ± {result['uncertainty']:.4f} at ratio {result['best_ratio']:g}; "
                 f"metric {result['seconds']:.1f} s (evaluate command {measured['wall_s']:.1f} s)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="config file (repeatable; default: the digits configs)")
    parser.add_argument("--per-class", type=int, default=30, help="labelled real rows per class")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="training config override")
    parser.add_argument("--eval-set", action="append", default=[], help="evaluate override (e.g. eval.uplift_repeats=2)")
    parser.add_argument("--quick", action="store_true", help="2 training steps, one repeat, one ratio, no fd_domain: "
                        "the code paths in seconds, not the figures")
    args = parser.parse_args()
    configs = [Path(c) for c in args.config] if args.config else \
        [ROOT / c for c in DEFAULT_CONFIGS if (ROOT / c).exists()]
    train_sets = (QUICK if args.quick else []) + args.overrides
    with tempfile.TemporaryDirectory() as home:
        for config in configs:
            measured = measure(config, Path(home), args.per_class, train_sets, (QUICK_EVAL if args.quick else []) + args.eval_set,
                               "uplift" if args.quick else "uplift,fd_domain")
            print("\n".join(report(config.name, measured)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
