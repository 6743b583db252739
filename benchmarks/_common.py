"""Shared by the benchmark scripts: run ganpipe as a user would, and time things."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def ganpipe(*args: str, home: Path, check: bool = True) -> dict[str, Any]:
    """`ganpipe ARGS --json` in a subprocess with GANPIPE_HOME=home; returns the JSON result."""
    env = {**os.environ, "GANPIPE_HOME": str(home), "TQDM_DISABLE": "1"}
    proc = subprocess.run([sys.executable, "-m", "ganpipe.cli", *args, "--json"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    if check and proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"ganpipe {' '.join(args)} failed with exit {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {}


def peak_rss_mb(pid: int | str = "self") -> float:
    """VmHWM: the peak resident set of a live process, in MB (ru_maxrss would carry across exec)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def write_untrained_run(folder: Path, spec: Any) -> None:
    """A run directory holding an untrained generator of `spec` (a ganpipe NetworkSpec, seed 0),
    as `ganpipe train` leaves it: what the export benchmarks load."""
    import torch

    from ganpipe.checkpoint import write_generator_folder
    from ganpipe.networks import build_generator

    torch.manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_generator_folder(folder / "generator", build_generator(spec).state_dict(), spec.to_json(), {})
    (folder / "run.json").write_text("{}")
