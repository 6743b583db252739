"""How long a stopped training run takes to leave no process behind.

Starts `ganpipe train` on a tiny config, waits for its first step line, then stops the launching
process - SIGTERM (what a Prefect cancellation sends the flow-run process: it kills the training's
process tree) or SIGKILL (nothing cleans up: each rank's watchdog notices) - and reports the
seconds until the launcher and every rank are gone.

    PYTHONPATH=$PWD python benchmarks/teardown.py [--num-processes 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.processes import process_running, training_processes

CONFIG = """
data: {source: "builtin:digits", resolution: 16}
model: {family: dcgan, latent_dim: 16, g_width: 8, d_width: 8}
train: {steps: 1000000, batch_size: 32, checkpoint_every: 1000, sample_every: 1000, log_every: 5}
register: {name: teardown-bench}
"""


def one_teardown(config: Path, home: Path, sig: signal.Signals, num_processes: int) -> tuple[float, int]:
    env = {**os.environ, "GANPIPE_HOME": str(home), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    cli = subprocess.Popen([sys.executable, "-m", "ganpipe.cli", "train", str(config), "--resume", "never",
                            "--num-processes", str(num_processes)], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    assert cli.stderr is not None
    for line in cli.stderr:
        if line.startswith("step "):
            break
    else:
        raise RuntimeError(f"training ended before its first step (exit {cli.wait()})")
    procs = training_processes(GANPIPE_LAUNCHER_PID=str(cli.pid))
    started = time.perf_counter()
    cli.send_signal(sig)
    while any(process_running(p) for p in procs):
        if time.perf_counter() - started > 60:
            raise RuntimeError(f"still running 60 s after {sig.name}: {[p.pid for p in procs if process_running(p)]}")
        time.sleep(0.01)
    elapsed = time.perf_counter() - started
    cli.wait()
    return elapsed, len(procs)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "bench.yaml"
        config.write_text(CONFIG)
        print(f"teardown of `ganpipe train` ({args.num_processes} rank(s)), {args.repeats} repeats, "
              f"{os.cpu_count()} CPUs")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            times = []
            for _ in range(args.repeats):
                elapsed, count = one_teardown(config, Path(tmp) / "home", sig, args.num_processes)
                times.append(elapsed)
            print(f"  {sig.name:7s} to the launching process: all {count} training processes gone in "
                  f"median {statistics.median(times):.2f} s (min {min(times):.2f}, max {max(times):.2f})")


if __name__ == "__main__":
    main()
