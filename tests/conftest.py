"""Shared fixtures. Every test gets its own GANPIPE_HOME; nothing reaches a real server unless a
test starts one on 127.0.0.1 itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GANPIPE = [sys.executable, "-m", "ganpipe.cli"]

# Offline and quiet everywhere, in this process and in every child.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
for variable in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "AWS_ENDPOINT_URL", "GANPIPE_INCEPTION_WEIGHTS"):
    os.environ.pop(variable, None)


@pytest.fixture(autouse=True)
def ganpipe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "ganpipe-home"
    home.mkdir()
    monkeypatch.setenv("GANPIPE_HOME", str(home))
    return home


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, timeout: int = 600
            ) -> subprocess.CompletedProcess:
    """Run `ganpipe ARGS` in a fresh process, as a user would."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run([*GANPIPE, *args], capture_output=True, text=True, env=full_env, cwd=cwd,
                          timeout=timeout)


def last_json(stdout: str) -> dict:
    """The contract: with --json, the last line of stdout is one JSON object."""
    return json.loads(stdout.strip().splitlines()[-1])


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def write_config(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_DIGITS = """
seed: 0
data:
  source: builtin:digits
  resolution: 16
model:
  family: dcgan
  latent_dim: 16
  g_width: 8
  d_width: 8
train:
  steps: 20
  batch_size: 32
  checkpoint_every: 10
  sample_every: 10
  log_every: 10
eval:
  metrics: [fd_domain]
  num_samples: 200
  bootstrap: 5
register:
  name: tiny-digits
export:
  num_images: 0
"""
