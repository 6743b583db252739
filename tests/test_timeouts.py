"""Time limits on the network (ganpipe.network): an endpoint that accepts connections and never
answers (tests.processes.SilentServer on 127.0.0.1) makes each command fail within its budget,
with one `error:` line naming the endpoint and exit 1, after exactly 1 + storage.retries attempts.

The end-to-end cases run with a 2-3 s budget; the default budget's worst case is computed from
the settings every client receives (benchmarks/network_timeouts.py measures it: about 35 s)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ganpipe import network
from ganpipe.errors import UserError
from tests.conftest import ROOT, error_lines, run_cli, write_config
from tests.processes import SilentServer

# Startup of a ganpipe process on a loaded 2-core machine (torch and mlflow imports) plus slack;
# without time limits each of these commands hangs for minutes.
STARTUP_S = 30


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    server = SilentServer()
    yield server
    server.close()


def timed_cli(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    result = run_cli(*args, env=env, timeout=240)
    return result, time.monotonic() - start


def assert_one_error_naming(result: subprocess.CompletedProcess, service: str, server: SilentServer,
                            timeout_s: float) -> None:
    assert result.returncode == 1, result.stderr[-3000:]
    assert error_lines(result.stderr) == [
        f"error: {service} {server.url} did not answer within {timeout_s:g} s (3 attempt(s); "
        f"storage.timeout_s={timeout_s:g}, storage.retries=2)"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_s3_ingest_from_a_silent_endpoint_fails_within_the_budget(silent: SilentServer, tmp_path: Path) -> None:
    config = write_config(tmp_path / "s3.yaml", "data:\n  source: s3://bucket/images\n")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    result, elapsed = timed_cli("ingest", str(config), "--set", f"storage.endpoint_url={silent.url}",
                                "--set", "storage.timeout_s=2", env=env)
    assert_one_error_naming(result, "S3 endpoint", silent, 2)
    assert silent.connections() == 3, "one connection per attempt: botocore retries, s3fs does not"
    assert elapsed < 2 + 3 + STARTUP_S  # the budget, botocore's backoff (at most 1 + 2 s), startup


def test_mlflow_register_against_a_silent_server_fails_within_the_budget(silent: SilentServer,
                                                                        tiny_run: Path) -> None:
    result, elapsed = timed_cli("register", "--run", str(tiny_run),
                                env={"MLFLOW_TRACKING_URI": silent.url, "GANPIPE_NETWORK_TIMEOUT": "3"})
    assert_one_error_naming(result, "MLflow tracking server", silent, 3)
    # The first request's failure ends registration: "no such model yet" needs an answer.
    assert silent.connections() == 3
    assert elapsed < 3 + 3 + STARTUP_S  # urllib3 backs off 0 s, then 2 s (+ jitter)


def test_prefect_deploy_against_a_silent_api_fails_within_the_budget(silent: SilentServer) -> None:
    result, elapsed = timed_cli("deploy", env={"PREFECT_API_URL": f"{silent.url}/api",
                                               "GANPIPE_NETWORK_TIMEOUT": "3"})
    assert_one_error_naming(result, "Prefect API", silent, 3)
    assert silent.connections() == 3
    assert elapsed < 3 + 6 + STARTUP_S  # Prefect backs off 2 s, then 4 s


def test_hub_dataset_from_a_silent_hub_fails_within_the_budget(silent: SilentServer, tmp_path: Path) -> None:
    """huggingface_hub retries a file lookup 5 more times with its own 60 s timeout; the breaker
    around its client stops after the budget's attempts."""
    config = write_config(tmp_path / "hub.yaml", "data:\n  source: someone/some-dataset\n")
    env = {"HF_ENDPOINT": silent.url, "HF_HUB_OFFLINE": "0", "HF_DATASETS_OFFLINE": "0",
           "HF_HOME": str(tmp_path / "hf-home"), "GANPIPE_NETWORK_TIMEOUT": "3"}
    result, elapsed = timed_cli("ingest", str(config), env=env)
    assert_one_error_naming(result, "Hugging Face hub", silent, 3)
    assert silent.connections() == 3
    assert elapsed < 3 + 3 + STARTUP_S  # the hub backs off 1 s, then 2 s


def test_a_refused_connection_is_one_line_naming_the_endpoint(tmp_path: Path) -> None:
    server = SilentServer()
    server.close()  # nothing listens on its port any more
    config = write_config(tmp_path / "s3.yaml", "data:\n  source: s3://bucket/images\n")
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    result = run_cli("ingest", str(config), "--set", f"storage.endpoint_url={server.url}", env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert error_lines(result.stderr) == [f"error: S3 endpoint {server.url} could not be reached "
                                          "(connection refused)"], result.stderr[-3000:]


def test_the_default_budget_stays_under_a_minute_in_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """Worst case for a silent endpoint with the defaults, from the settings each client gets:
    attempts x per-attempt timeout + the clients' backoff between attempts."""
    # `use` writes the environment: give it a copy, so nothing leaks into later tests.
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in
                                        (network.TIMEOUT_VARIABLE, network.RETRIES_VARIABLE, *network.LIBRARY_VARIABLES)})
    os.environ["PREFECT_API_URL"] = "http://127.0.0.1:1/api"  # the budget is Prefect's only for a server
    chosen = network.use()
    assert (chosen.timeout_s, chosen.retries) == (30, 2)

    boto = network.botocore_config()
    assert boto["retries"] == {"total_max_attempts": 3, "mode": "standard"}
    s3_worst = boto["retries"]["total_max_attempts"] * boto["read_timeout"] + (1 + 2)  # backoff < 2^(n-1) s
    mlflow_attempts = int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) + 1
    mlflow_worst = mlflow_attempts * int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) + \
        sum(int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]) * 2 ** (n - 1) for n in range(2, mlflow_attempts)) + \
        (mlflow_attempts - 1) * float(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"])
    prefect_attempts = int(os.environ["PREFECT_CLIENT_MAX_RETRIES"]) + 1
    prefect_worst = prefect_attempts * float(os.environ["PREFECT_API_REQUEST_TIMEOUT"]) + \
        sum(2 ** n * 1.2 for n in range(1, prefect_attempts))  # 2^n s with 20 % jitter
    hub_worst = chosen.attempts * int(os.environ["HF_HUB_ETAG_TIMEOUT"]) + (1 + 2)
    worst = {"s3": s3_worst, "mlflow": mlflow_worst, "prefect": prefect_worst, "hub": hub_worst}
    assert all(30 <= seconds < 60 for seconds in worst.values()), worst


def test_a_pipeline_task_does_not_retry_an_endpoint_that_did_not_answer() -> None:
    """Its requests spent their retries within storage.timeout_s; a task retry would multiply that."""
    from botocore.exceptions import ClientError, ReadTimeoutError

    from flows.pipeline import retry_unless_bad_input

    class Failed:
        def __init__(self, exc: Exception) -> None:
            self.exc = exc

        def result(self) -> None:
            raise self.exc

    silent = ReadTimeoutError(endpoint_url="http://127.0.0.1:9/bucket?list-type=2")
    try:
        raise OSError("listing failed") from silent  # as wrapped by a caller
    except OSError as exc:
        wrapped = exc
    no_bucket = ClientError({"Error": {"Code": "NoSuchBucket", "Message": "gone"}}, "ListObjectsV2")
    retried = {name: retry_unless_bad_input(None, None, Failed(exc)) for name, exc in
               {"silent": silent, "wrapped": wrapped, "no bucket": no_bucket, "bad input": UserError("x")}.items()}
    assert retried == {"silent": False, "wrapped": False, "no bucket": True, "bad input": False}
    assert str(network.unreachable(wrapped)).startswith("S3 endpoint http://127.0.0.1:9 did not answer within")


def test_budget_settings_are_validated_and_the_users_own_library_settings_win(tmp_path: Path) -> None:
    from ganpipe.config_files import load_config

    config = write_config(tmp_path / "c.yaml", "data:\n  source: builtin:digits\n")
    with pytest.raises(UserError, match=r"key 'storage.timeout_s'"):
        load_config(config, ["storage.timeout_s=0"])
    with pytest.raises(UserError, match=r"key 'storage.retries'"):
        load_config(config, ["storage.retries=-1"])

    result = run_cli("ingest", str(config), env={"GANPIPE_NETWORK_TIMEOUT": "soon"})
    assert result.returncode == 2
    assert error_lines(result.stderr) == ["error: GANPIPE_NETWORK_TIMEOUT: expected a float in (0, 3600], "
                                          "got 'soon'"]

    # A child process derives MLflow's setting from the budget it inherits; the user's own stays.
    show = ("import os; from ganpipe import network; network.use(); "
            "print(os.environ['MLFLOW_HTTP_REQUEST_TIMEOUT'], os.environ['PREFECT_API_REQUEST_TIMEOUT'])")
    env = {k: v for k, v in os.environ.items() if k not in network.LIBRARY_VARIABLES}
    env.update({"PYTHONPATH": str(ROOT), network.TIMEOUT_VARIABLE: "12", network.RETRIES_VARIABLE: "1",
                network.DERIVED_VARIABLE: "MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_TIMEOUT": "99",
                "PREFECT_API_REQUEST_TIMEOUT": "77", "PREFECT_API_URL": "http://127.0.0.1:1/api"})
    out = subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["6", "77"]  # 12 s over 2 attempts; Prefect's was the user's
