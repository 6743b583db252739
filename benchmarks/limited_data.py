"""Limited data: 300 labelled digits (30 per class) at 32 px, conditional. The shipped conditional
DCGAN config (configs/digits-cgan.yaml, no augmentation) against the limited-data recipe
(configs/digits-limited.yaml) at an equal compute budget, then both generators scored with
`ganpipe evaluate --metrics fd_domain,cas,uplift` against the real digits (all of them, at 32 px).

Equal budget: a short in-process calibration measures each config's CPU seconds per training
step; each then trains for budget / (seconds per step) steps. The budget defaults to the last
candidate's (the recipe's) own train.steps at its measured speed, so the recipe trains as shipped
and DCGAN gets the same CPU time. Everything runs single-threaded (OMP_NUM_THREADS=1): CPU time
is then the wall time on one idle core, whatever else the machine runs (with several threads on
a busy machine, OpenMP's spinning threads count CPU time that is not work). Checkpoint scoring
is off for every candidate (train.best_metric none), so the budget is training alone.

A metric that comes back unavailable (an unknown metric in this version, or one that cannot run
here) is reported as such; the others still run.

One training is one draw: fd_domain moves by about 5 between seeds of one config, and uplift's
paired differences by a point or two between repeats. `--seeds 0,1,2,3,4` trains every candidate
once per seed and ends with a table over seeds: mean ± standard error over seeds of each metric
and of the uplift at each ratio. uplift defaults to the regime it is about: --per-class real
rows per class (eval.uplift_real_per_class) and 8 repeats (eval.uplift_repeats); --eval-set
overrides either.

    python -m benchmarks.limited_data [--budget-s 1200] [--per-class 30] [--metrics fd_domain,cas,uplift]
        [--candidate NAME=CONFIG[,key=value...]] [--eval-set eval.key=value] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks._common import ROOT

CALIBRATION_STEPS = 30  # timed, after WARMUP_STEPS (first steps pay for allocation and kernel choice)
WARMUP_STEPS = 2
TABLE_METRICS = ("fd_domain", "cas", "uplift")


@dataclass
class Candidate:
    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    seed: int | None = None  # --seeds: this run's (its name is NAME-sSEED)
    cpu_per_step: float = 0.0
    steps: int = 0
    train_wall_s: float = 0.0
    train_cpu_s: float = 0.0
    run_dir: str = ""
    results: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        return self.name if self.seed is None else f"{self.name}-s{self.seed}"


def parse_candidate(text: str) -> Candidate:
    """NAME=CONFIG[,key=value...]: a config file and --set overrides."""
    name, _, rest = text.partition("=")
    config, *overrides = rest.split(",")
    return Candidate(name, Path(config), overrides)


def environment(home: Path) -> dict[str, str]:
    return {**os.environ, "GANPIPE_HOME": str(home), "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cli(args: list[str], home: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ganpipe.cli", *args, "--json"], cwd=ROOT, env=environment(home),
                          capture_output=True, text=True)


def calibrate(candidate: Candidate, home: Path) -> float:
    """CPU seconds per training step of the candidate's config, measured in a child process (a
    Trainer stepping in memory: no checkpoints, previews or start-up in the figure)."""
    code = (
        "import json, sys, time\n"
        "from ganpipe.config_files import load_config\n"
        "from ganpipe.trainer import Trainer\n"
        "from tests.fixtures import new_run_dir\n"
        "cfg = load_config(sys.argv[1], json.loads(sys.argv[2]))\n"
        "trainer = Trainer(cfg, new_run_dir(cfg))\n"
        f"for _ in range({WARMUP_STEPS}):\n"
        "    trainer.iteration(); trainer.step += 1\n"
        "start = time.process_time()\n"
        f"for _ in range({CALIBRATION_STEPS}):\n"
        "    trainer.iteration(); trainer.step += 1\n"
        f"print(json.dumps((time.process_time() - start) / {CALIBRATION_STEPS}))\n")
    overrides = [*candidate.overrides, f"train.run_name=calibrate-{candidate.name}", "train.steps=1000000"]
    proc = subprocess.run([sys.executable, "-c", code, str(candidate.config), json.dumps(overrides)], cwd=ROOT,
                          env=environment(home), capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"calibration of {candidate.name} failed with exit {proc.returncode}")
    return float(proc.stdout.strip().splitlines()[-1])


INTERRUPTED = (130, 143, -2, -15)  # SIGINT / SIGTERM from outside: the run resumes from its checkpoint
ATTEMPTS = 3


def train(candidate: Candidate, home: Path) -> None:
    """`ganpipe train` with the candidate's step count; its wall time and the CPU time of the
    command and every process it waited for (os.wait4: runs may go on side by side). A run
    stopped from outside continues from its last checkpoint (`--resume auto`, bitwise the same
    run); the times add up over the attempts."""
    overrides = [*candidate.overrides, f"train.steps={candidate.steps}", f"train.run_name=bench-{candidate.run_name}"]
    command = [sys.executable, "-m", "ganpipe.cli", "train", str(candidate.config),
               *[a for o in overrides for a in ("--set", o)], "--json"]
    for attempt in range(1, ATTEMPTS + 1):
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            started = time.time()
            proc = subprocess.Popen(command, cwd=ROOT, env=environment(home), stdout=out, stderr=err, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            candidate.train_wall_s += time.time() - started
            candidate.train_cpu_s += usage.ru_utime + usage.ru_stime
            out.seek(0), err.seek(0)
            stdout, stderr = out.read(), err.read()
        if proc.returncode == 0:
            candidate.run_dir = json.loads(stdout.strip().splitlines()[-1])["run_dir"]
            return
        if proc.returncode not in INTERRUPTED or attempt == ATTEMPTS:
            break
        print(f"{candidate.run_name}: training stopped from outside (exit {proc.returncode}); resuming", flush=True)
    sys.stderr.write(stderr[-4000:])
    raise SystemExit(f"training {candidate.run_name} failed with exit {proc.returncode}")


def evaluate(candidate: Candidate, real: str, metrics: list[str], eval_sets: list[str], num_samples: int,
             home: Path) -> None:
    """`ganpipe evaluate`; when the command refuses a metric (or its settings) that this version
    lacks, that metric is reported unavailable and the others are evaluated without it."""
    pending, settings = list(metrics), list(eval_sets)
    while pending:
        proc = cli(["evaluate", "--real", real, "--fake", candidate.run_dir, "--metrics", ",".join(pending),
                    "--num-samples", str(num_samples), *[a for s in settings for a in ("--set", s)]], home)
        if proc.returncode == 0:
            candidate.results.update(json.loads(proc.stdout.strip().splitlines()[-1]))
            return
        error = next((line for line in proc.stderr.splitlines() if line.startswith("error:")), proc.stderr[-300:])
        named = error.split("(available")[0]  # "unknown metric(s) uplift (available: fid, ...)"
        refused = [m for m in pending if m in named] or pending
        # A refused setting (eval.uplift_*) belongs to the refused metric: drop both.
        refused_settings = [s for s in settings if s.split("=")[0] in error or any(m in s for m in refused)]
        for name in refused:
            candidate.results[name] = {"value": None, "error": error.removeprefix("error: ").strip()}
        pending = [m for m in pending if m not in refused]
        settings = [s for s in settings if s not in refused_settings]


def shown(result: dict[str, Any] | None, percent: bool = False) -> str:
    if not result or result.get("value") is None:
        return "unavailable"
    scale = 100 if percent else 1
    text = f"{scale * result['value']:.2f} ± {scale * (result.get('uncertainty') or 0):.2f}"
    return text + ("%" if percent else "")


def table(candidates: list[Candidate]) -> list[str]:
    header = f"{'generator':<20} {'steps':>6} {'cpu s/step':>10} {'train cpu s':>11} {'train wall s':>12} " \
             f"{'fd_domain (lower)':>18} {'CAS':>16} {'uplift':>16}"
    rows = [header, "-" * len(header)]
    for c in candidates:
        rows.append(f"{c.run_name:<20} {c.steps:>6} {c.cpu_per_step:>10.3f} {c.train_cpu_s:>11.0f} "
                    f"{c.train_wall_s:>12.0f} {shown(c.results.get('fd_domain')):>18} "
                    f"{shown(c.results.get('cas'), percent=True):>16} {shown(c.results.get('uplift'), percent=True):>16}")
    for c in candidates:
        cas = c.results.get("cas") or {}
        if cas.get("real_accuracy") is not None:
            rows.append(f"{c.run_name}: CAS's classifier trained on real data instead: {100 * cas['real_accuracy']:.1f}% "
                        f"(the ceiling; {cas.get('num_train')} training rows, {cas.get('num_test')} held out)")
        uplift = c.results.get("uplift") or {}
        if uplift.get("value") is not None:
            rows.append(f"{c.run_name}: uplift real-only {uplift.get('real_only')}, best ratio {uplift.get('best_ratio')}")
        for name, result in c.results.items():
            if result.get("value") is None:
                rows.append(f"{c.run_name}: {name} unavailable: {result.get('error')}")
    return rows


def mean_and_error(values: list[float]) -> str:
    """'mean ± standard error' (± ? from a single value)."""
    mean = float(np.mean(values))
    error = f"{np.std(values, ddof=1) / math.sqrt(len(values)):.2f}" if len(values) > 1 else "?"
    return f"{mean:.2f} ± {error}"


def seed_table(runs: list[Candidate]) -> list[str]:
    """Each candidate over its seeds: fd_domain, CAS, best-ratio uplift and the uplift at each ratio,
    as mean ± standard error over seeds (percent for all but fd_domain). The seeds are the
    independent draws: every seed's uplift uses the same real rows, so the spread over seeds, not
    the repeats' own ±, is what says whether two candidates differ."""
    rows = ["", "over seeds (mean ± standard error):"]
    for name in dict.fromkeys(r.name for r in runs):
        mine = [r for r in runs if r.name == name]
        figures = []
        for metric, scale in (("fd_domain", 1), ("cas", 100), ("uplift", 100)):
            values = [scale * r.results[metric]["value"] for r in mine
                      if (r.results.get(metric) or {}).get("value") is not None]
            if values:
                figures.append(f"{metric} {mean_and_error(values)}{'%' if scale == 100 else ''}")
        rows.append(f"{name} (seeds {', '.join(str(r.seed) for r in mine)}): {'; '.join(figures)}")
        uplifts = [r.results["uplift"] for r in mine if (r.results.get("uplift") or {}).get("value") is not None]
        for ratio in (uplifts[0]["ratios"] if uplifts else []):
            gains = [100 * row["uplift"] for u in uplifts for row in u["ratios"] if row["ratio"] == ratio["ratio"]]
            rows.append(f"  uplift at ratio {ratio['ratio']:g}: {mean_and_error(gains)}%")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidate", action="append", default=[], type=parse_candidate,
                        help="NAME=CONFIG[,key=value...] (repeatable; default: dcgan and digits-limited)")
    parser.add_argument("--budget-s", type=float, help="CPU seconds of training per generator (default: the "
                        "last candidate's train.steps at its measured speed)")
    parser.add_argument("--per-class", type=int, default=30, help="labelled images per class (data.max_per_class)")
    parser.add_argument("--metrics", default=",".join(TABLE_METRICS))
    parser.add_argument("--eval-set", action="append", default=[],
                        help="evaluate --set override (e.g. eval.uplift_real_per_class=30)")
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--real", default="builtin:digits")
    parser.add_argument("--cpu-per-step", type=lambda text: {k: float(v) for k, v in
                                                         (item.split("=") for item in text.split(","))},
                        default={}, help="NAME=SECONDS,...: skip calibrating these (figures of an earlier "
                        "calibration, e.g. to continue an interrupted benchmark in the same --home)")
    parser.add_argument("--parallel", type=int, default=1, help="trainings (each single-threaded) and then evaluations side by side")
    parser.add_argument("--home", type=Path, help="GANPIPE_HOME to use and keep (default: a temporary one)")
    parser.add_argument("--json-out", type=Path, help="also write the figures here")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")],
                        help="train every candidate once per seed (e.g. 0,1,2) and add a table over seeds")
    args = parser.parse_args()
    eval_sets = [*(default for default in (f"eval.uplift_real_per_class={args.per_class}", "eval.uplift_repeats=8")
                   if not any(s.startswith(default.split("=")[0] + "=") for s in args.eval_set)), *args.eval_set]
    common = ["data.resolution=32", f"data.max_per_class={args.per_class}", "model.conditional=true",
              "train.best_metric=none", "train.final_generator=last"]
    candidates = args.candidate or [
        Candidate("dcgan", ROOT / "configs/digits-cgan.yaml", ["train.augment=none"]),
        Candidate("digits-limited", ROOT / "configs/digits-limited.yaml")]
    for c in candidates:
        c.overrides = [*common, *c.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        home = args.home or Path(tmp)
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
        for c in candidates:
            c.cpu_per_step = args.cpu_per_step.get(c.name) or calibrate(c, home)
            print(f"{c.name}: {c.cpu_per_step:.3f} CPU s per step", flush=True)
        if args.budget_s is None:
            from ganpipe.config_files import load_config  # only here: the script's --help stays fast

            last = candidates[-1]
            budget = load_config(last.config, last.overrides).train.steps * last.cpu_per_step
        else:
            budget = args.budget_s
        print(f"budget: {budget:.0f} CPU s of training each", flush=True)
        for c in candidates:
            c.steps = max(1, round(budget / c.cpu_per_step))
        runs = [replace(c, seed=seed, overrides=[*c.overrides, f"seed={seed}"], results={}) for c in candidates
                for seed in args.seeds] if args.seeds else candidates
        with ThreadPoolExecutor(args.parallel) as pool:  # each run single-threaded: side by side is fair
            for c in pool.map(lambda c: (train(c, home), c)[1], runs):
                print(f"{c.run_name}: {c.steps} steps in {c.train_wall_s:.0f} s wall, {c.train_cpu_s:.0f} CPU s "
                      f"(load average now {os.getloadavg()[0]:.1f})", flush=True)
        def scored(c: Candidate) -> tuple[Candidate, float]:
            started = time.time()
            evaluate(c, args.real, args.metrics.split(","), eval_sets, args.num_samples, home)
            return c, time.time() - started

        with ThreadPoolExecutor(args.parallel) as pool:  # the scores do not depend on what runs beside them
            for c, seconds in pool.map(scored, runs):
                print(f"{c.run_name}: evaluated in {seconds:.0f} s", flush=True)
    print()
    print("\n".join(table(runs) + (seed_table(runs) if args.seeds else [])))
    if args.json_out:
        args.json_out.write_text(json.dumps([c.__dict__ | {"config": str(c.config)} for c in runs], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
