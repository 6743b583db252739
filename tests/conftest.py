"""Shared fixtures. Every test gets its own GANPIPE_HOME; nothing reaches a real server unless a
test starts one on 127.0.0.1 itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
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
def ganpipe_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    home = tmp_path / "ganpipe-home"
    home.mkdir()
    monkeypatch.setenv("GANPIPE_HOME", str(home))
    yield home
    # mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI into os.environ: a test that calls it
    # must not point later tests' subprocesses at its store.
    for variable in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        os.environ.pop(variable, None)


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
  best_metric: none  # scoring checkpoints costs ~10 s per run; test_training covers it
eval:
  metrics: [fd_domain]
  num_samples: 200
  bootstrap: 5
register:
  name: tiny-digits
export:
  num_images: 0
"""


# --- S3: moto's server mode, a real HTTP endpoint on 127.0.0.1 ------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, timeout: float = 60.0) -> None:
    import time
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)  # noqa: S310 - loopback only
            return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error status: the server is up
                return
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not come up in {timeout}s")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """A moto S3 server process on 127.0.0.1 for the whole session."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(endpoint)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> tuple[str, str]:
    """(endpoint, bucket): a fresh bucket, with the standard AWS variables pointing at moto."""
    import re
    import uuid

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return s3_endpoint, bucket


# --- a tiny trained run, shared by the tests that need a generator --------------------------------

@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 20-step DCGAN run on 16x16 digits, trained once per session in its own home.
    Tests may read it, never modify it (copy it first)."""
    from ganpipe.config_files import load_config
    from ganpipe.launch import launch_training

    home = tmp_path_factory.mktemp("tiny-run-home")
    config = write_config(home / "tiny.yaml", TINY_DIGITS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GANPIPE_HOME", str(home))
        result = launch_training(load_config(config), resume="auto")
    return Path(result["run_dir"])


@pytest.fixture(scope="session")
def tiny_conditional_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_run, but a conditional DCGAN (10 digit classes)."""
    from ganpipe.config_files import load_config
    from ganpipe.launch import launch_training

    home = tmp_path_factory.mktemp("tiny-cond-home")
    config = write_config(home / "tiny.yaml", TINY_DIGITS)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GANPIPE_HOME", str(home))
        cfg = load_config(config, ["model.conditional=true", "register.name=tiny-digits-cgan"])
        result = launch_training(cfg, resume="auto")
    return Path(result["run_dir"])


# --- MLflow: a real `mlflow server` on 127.0.0.1, sqlite backend, artifacts in moto S3 -------------

@dataclass
class MlflowServer:
    uri: str  # http://127.0.0.1:PORT, also exported as MLFLOW_TRACKING_URI for the test
    artifacts: str  # s3://BUCKET/mlflow: where the server puts every artifact
    bucket: str
    s3_endpoint: str
    log: Path


@pytest.fixture
def mlflow_server(s3: tuple[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowServer]:
    """A tracking server process for one test (with the `s3` fixture's fresh bucket). Clients,
    including `ganpipe` subprocesses, reach it through MLFLOW_TRACKING_URI; artifacts are proxied
    by the server, so only the server needs the S3 endpoint and credentials."""
    import signal

    endpoint, bucket = s3
    port = free_port()
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    artifacts = f"s3://{bucket}/mlflow"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": endpoint, "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = folder / "server.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}", "--artifacts-destination", artifacts],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=folder, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # a loaded 2-core machine can take a minute or more
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{log_path.read_text()[-3000:]}")
            try:
                wait_for_http(f"{uri}/health", timeout=1.0)
                break
            except TimeoutError:
                continue
        else:
            raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}")
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        yield MlflowServer(uri, artifacts, bucket, endpoint, log_path)
    finally:
        # The server runs uvicorn workers in its own session: stop the whole group it started.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()
