"""A pipeline's log holds ganpipe's lines, not Prefect's or MLflow's noise: no telemetry traceback
from Prefect's temporary server, no per-artifact download bars. conftest.py quiets both for the
suite, so these tests clear those variables to check what ganpipe itself sets, and that a
user's own setting wins. (A real `ganpipe pipeline` run is what showed the noise; it is too slow
to repeat here.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ganpipe.cli import PREFECT_DEFAULTS, set_prefect_defaults
from tests.conftest import ROOT

QUIETED = ("PREFECT_SERVER_ANALYTICS_ENABLED", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")


def _python(code: str, **env: str) -> str:
    """The last stdout line of `python -c code` in an environment without the quieting variables."""
    clean = {k: v for k, v in os.environ.items() if k not in QUIETED} | env
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=clean, cwd=ROOT,
                          timeout=120, check=True)
    return proc.stdout.strip().splitlines()[-1]


def test_prefect_defaults_turn_off_the_temporary_servers_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in PREFECT_DEFAULTS:
        monkeypatch.delenv(variable, raising=False)
    set_prefect_defaults()
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "180"
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "30")
    set_prefect_defaults()
    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"
    assert os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "30"


def test_prefect_reads_the_defaults_when_the_pipeline_imports_it() -> None:
    """The defaults are set before the first Prefect import, so Prefect's settings (and the
    temporary server's environment) carry them."""
    code = ("from ganpipe.cli import set_prefect_defaults; set_prefect_defaults(); "
            "from prefect.settings import get_current_settings; s = get_current_settings().server; "
            "print(s.analytics_enabled, s.ephemeral.startup_timeout_seconds)")
    assert _python(code) == "False 180"


def test_mlflow_downloads_draw_no_progress_bars_unless_the_user_asks() -> None:
    code = ("import ganpipe.registry; from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR "
            "as bar; print(bar.get())")
    assert _python(code) == "False"
    assert _python(code, MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="true") == "True"
