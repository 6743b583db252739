"""Deployments end to end, as in the README's "Orchestration" section: a `prefect server` on
127.0.0.1 (its own PREFECT_HOME), `ganpipe deploy`, a `process` worker, triggered runs of the
pipeline deployment on a tiny config - one to completion, one cancelled mid-training, one whose
flow-run process is SIGKILLed mid-training. One server and worker serve every test here, and
the flow runs share one GANPIPE_HOME (the later runs continue the first run's training)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import numpy as np
import pytest
from PIL import Image

from tests.conftest import ROOT, TINY_DIGITS, free_port, last_json, run_cli, wait_for_http, write_config
from tests.processes import start_logged, stop_process, training_processes
from tests.test_flows import (
    alive,
    artifacts,
    is_rank,
    log_messages,
    table_rows,
    task_runs,
    wait_for,
)
from tests.test_prefect_summary import pictures

pytestmark = pytest.mark.slow

DEPLOY = """
deploy:
  cron: "0 3 * * *"
  timezone: Europe/Berlin
  work_pool: ganpipe-test-pool
"""
PIPELINE = "ganpipe-training-pipeline/tiny-digits"


@dataclass
class Stack:
    env: dict[str, str]  # PREFECT_API_URL, PREFECT_HOME, GANPIPE_HOME, PYTHONPATH for every process here
    config: Path
    home: Path
    logs: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("orchestration")
    port = free_port()
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_"))}
    env = {**inherited, "PREFECT_HOME": str(root / "prefect"), "GANPIPE_HOME": str(root / "ganpipe-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    server = start_logged([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                           str(port), "--no-ui"], env, root / "server.log", ROOT)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/api/health", timeout=240)
        yield Stack(env, write_config(root / "tiny.yaml", TINY_DIGITS + DEPLOY), root / "ganpipe-home", root)
    finally:
        stop_process(server)


@pytest.fixture(scope="module")
def deployed(stack: Stack) -> dict[str, Any]:
    result = run_cli("deploy", str(stack.config), "--set", "train.log_every=5", "--json", env=stack.env)
    assert result.returncode == 0, result.stderr[-3000:]
    return last_json(result.stdout)


@pytest.fixture(scope="module")
def worker(stack: Stack, deployed: dict[str, Any]) -> Iterator[None]:
    proc = start_logged([sys.executable, "-m", "prefect", "worker", "start", "--pool", deployed["work_pool"]],
                        stack.env, stack.logs / "worker.log", ROOT)
    try:
        yield
    finally:
        stop_process(proc)


@pytest.fixture
def client(stack: Stack) -> Iterator[Any]:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.env["PREFECT_API_URL"]}), get_client(sync_client=True) as c:
        yield c


def trigger(client: Any, overrides: list[str]) -> UUID:
    deployment = client.read_deployment_by_name(PIPELINE)
    return client.create_flow_run_from_deployment(deployment.id, parameters={"overrides": overrides}).id


def final_state(client: Any, flow_run_id: UUID, timeout: float) -> Any:
    return wait_for(lambda: (s := client.read_flow_run(flow_run_id).state) and s.is_final() and s,
                    timeout=timeout, what=f"flow run {flow_run_id} to finish", every=1.0)


def wait_for_training(client: Any, flow_run_id: UUID) -> list[Any]:
    """Once the trainer's step lines reach the run log: the flow run's training processes."""
    wait_for(lambda: any(m.startswith("step ") for m in log_messages(client, flow_run_id)), timeout=600,
             what="training to log its steps", every=1.0)
    procs = training_processes(GANPIPE_FLOW_RUN_ID=str(flow_run_id))
    assert any(is_rank(p) for p in procs), "a rank"  # one local process has no launcher between
    return procs


def test_deploy_creates_the_deployments_and_the_process_pool(stack: Stack, deployed: dict[str, Any],
                                                             client: Any) -> None:
    assert deployed["deployments"] == [PIPELINE, "ganpipe-export/tiny-digits"]
    assert deployed["work_pool"] == "ganpipe-test-pool"
    assert client.read_work_pool("ganpipe-test-pool").type == "process"
    parameters = {"config_path": str(stack.config), "overrides": ["train.log_every=5"]}
    pipeline = client.read_deployment_by_name(PIPELINE)
    assert pipeline.parameters == parameters and pipeline.work_pool_name == "ganpipe-test-pool"
    assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in pipeline.schedules] == \
        [("0 3 * * *", "Europe/Berlin", True)]
    export = client.read_deployment_by_name("ganpipe-export/tiny-digits")
    assert export.parameters == parameters and export.schedules == []

    # Deploying again updates the same deployments: the new schedule replaces the old one.
    again = run_cli("deploy", str(stack.config), "--set", "deploy.cron=30 4 * * 1", "--set", "train.log_every=5",
                    "--json", env=stack.env)
    assert again.returncode == 0, again.stderr[-3000:]
    updated = client.read_deployment_by_name(PIPELINE)
    assert updated.id == pipeline.id
    assert [s.schedule.cron for s in updated.schedules] == ["30 4 * * 1"]
    assert updated.parameters["overrides"] == ["deploy.cron=30 4 * * 1", "train.log_every=5"]

    # Without a config: unscheduled deployments whose runs name their config.
    from flows.deploy import deploy

    bare = deploy(None, [], None)
    assert bare["deployments"] == ["ganpipe-training-pipeline/on-demand", "ganpipe-export/on-demand"]
    on_demand = client.read_deployment_by_name("ganpipe-training-pipeline/on-demand")
    assert on_demand.parameters == {"overrides": []} and on_demand.schedules == []
    assert client.read_work_pool(bare["work_pool"]).type == "process" and bare["work_pool"] == "ganpipe-gpu"


def test_prefect_deploy_all_reads_prefect_yaml(stack: Stack, client: Any) -> None:
    """`prefect deploy --all` from the repo root, as the README says: prefect.yaml's two demo deployments."""
    prefect = [sys.executable, "-m", "prefect", "--no-prompt"]
    subprocess.run([*prefect, "work-pool", "create", "ganpipe-gpu", "--type", "process"], env=stack.env,
                   cwd=ROOT, capture_output=True, timeout=120, check=False)  # already there when deploy(None) ran
    result = subprocess.run([*prefect, "deploy", "--all"], env=stack.env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    pipeline = client.read_deployment_by_name("ganpipe-training-pipeline/digits-dcgan")
    export = client.read_deployment_by_name("ganpipe-export/digits-dcgan")
    try:
        for deployment in (pipeline, export):
            assert deployment.parameters == {"config_path": "configs/digits-dcgan.yaml", "overrides": []}
            assert deployment.work_pool_name == "ganpipe-gpu"
        assert [(s.schedule.cron, s.schedule.timezone) for s in pipeline.schedules] == [("0 3 * * *", "UTC")]
        assert export.schedules == []
    finally:  # their nightly schedule must not create runs for the rest of this module
        for deployment in (pipeline, export):
            client.delete_deployment(deployment.id)


def test_triggered_pipeline_completes_with_artifacts(stack: Stack, worker: None, client: Any) -> None:
    """Triggered as the README does; the artifacts read back agree with the MLflow registry."""
    import mlflow

    run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", PIPELINE], env=stack.env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    flow_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1))
    state = final_state(client, flow_run_id, timeout=900)
    assert state.is_completed(), (state.name, state.message, (stack.logs / "worker.log").read_text()[-3000:])

    assert list(task_runs(client, flow_run_id)) == ["ingest", "train", "evaluate", "register"]
    logs = log_messages(client, flow_run_id)
    assert any(m.startswith("step 20/20 ") for m in logs), "the trainer's lines stream into the run log"
    store = f"sqlite:///{stack.home / 'mlflow.db'}"
    registry = mlflow.MlflowClient(tracking_uri=store, registry_uri=store)
    version = registry.get_model_version_by_alias("tiny-digits", "champion")
    assert int(version.version) == 1
    trained = registry.get_run(version.run_id).data.metrics

    found = artifacts(client, flow_run_id)
    assert {"ganpipe-summary", "ganpipe-metrics", "ganpipe-training-progress"} <= set(found)
    assert found["ganpipe-training-progress"].data == 100.0
    rows = table_rows(found["ganpipe-metrics"].data)
    assert [r["metric"] for r in rows] == ["fd_domain"]
    assert rows[0]["value"] == pytest.approx(trained["eval_fd_domain"])
    assert rows[0]["uncertainty"] == pytest.approx(trained["eval_fd_domain_uncertainty"]) and rows[0]["uncertainty"] > 0
    summary = found["ganpipe-summary"].data
    assert "# ganpipe pipeline: tiny-digits v1" in summary
    assert "- model: `models:/tiny-digits/1` (aliases: champion)" in summary
    assert f"- alias decision: {version.tags['ganpipe.alias_decision']}" in summary
    assert f"| fd_domain | {rows[0]['value']:.4g} | ± {rows[0]['uncertainty']:.3g} |" in summary
    assert "- export: not configured" in summary
    assert f"MLflow run `{version.run_id}`" in summary
    # The picture a person scanning runs sees: the version's registered grid (146 px, shown 2x).
    assert "- uplift" not in summary and "accuracy against synthetic ratio" not in summary  # not computed
    shown = pictures(summary)
    assert list(shown) == ["samples of tiny-digits v1"]
    registered = registry.download_artifacts(version.run_id, "registry/v1/samples.png", str(stack.logs))
    grid = np.asarray(Image.open(registered).convert("RGB"))
    assert grid.shape == (146, 146, 3) and np.array_equal(shown["samples of tiny-digits v1"], grid.repeat(2, 0).repeat(2, 1))


def test_cancelling_a_flow_run_kills_every_training_process(worker: None, client: Any) -> None:
    from prefect.states import Cancelling

    flow_run_id = trigger(client, ["train.steps=1000000", "train.log_every=5"])
    procs = wait_for_training(client, flow_run_id)
    client.set_flow_run_state(flow_run_id, Cancelling())
    state = final_state(client, flow_run_id, timeout=120)
    assert state.is_cancelled(), (state.name, state.message)
    assert alive(procs) == [], f"survived the cancellation: {[p.pid for p in alive(procs)]}"
    assert training_processes(GANPIPE_FLOW_RUN_ID=str(flow_run_id)) == []
    # The second flow run on the same data: ingest was a cache hit.
    assert any(m.startswith("ingest: 1797 records") and m.endswith("(cache hit)") for m in log_messages(client, flow_run_id))


def test_no_training_process_survives_a_sigkilled_flow_run(worker: None, client: Any) -> None:
    """The flow-run process gets no chance to clean up: each rank's watchdog sees it gone. Two
    ranks, which torchrun starts in sessions of their own, outside the launcher's group."""
    import psutil

    flow_run_id = trigger(client, ["train.steps=1000000", "train.log_every=5", "train.num_processes=2"])
    procs = wait_for_training(client, flow_run_id)
    assert len([p for p in procs if is_rank(p)]) == 2
    launcher_pids = {int(p.environ()["GANPIPE_LAUNCHER_PID"]) for p in procs}
    assert len(launcher_pids) == 1
    flow_process = psutil.Process(launcher_pids.pop())
    assert flow_process.environ().get("PREFECT__FLOW_RUN_ID") == str(flow_run_id), "the flow-run process"
    flow_process.send_signal(signal.SIGKILL)
    wait_for(lambda: alive(procs) == [], timeout=60, what="the training processes to exit", every=0.5)
    assert training_processes(GANPIPE_FLOW_RUN_ID=str(flow_run_id)) == []
    state = final_state(client, flow_run_id, timeout=120)
    assert state.is_crashed(), (state.name, state.message)
