"""The Prefect flows under prefect_test_harness: a real (temporary) Prefect API, real training
subprocesses, real MLflow and S3 (moto) stores. What each test proves is in its name.

The helpers at the top read runs back through the Prefect client; tests/test_orchestration.py
uses them against a `prefect server` too.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect import flow

from flows.evaluation import evaluation_flow
from flows.export import export_flow
from flows.pipeline import (
    ingest_task,
    require_primary_metric,
    train_task,
    training_pipeline,
)
from ganpipe.config_files import load_config
from ganpipe.errors import EvaluationFailed
from tests.conftest import TINY_DIGITS, write_config
from tests.processes import process_running, training_processes

# --- reading runs back through the Prefect client ------------------------------------------------
# Explicit limit/offset/sort on every filter call keep these reads independent of how the API
# treats unset values (Prefect 3.8 on fastapi >= 0.151 rejects them with 422).


def task_runs(client: Any, flow_run_id: UUID) -> dict[str, Any]:
    """{task name: its task run} of one flow run (task run names are `name-xyz`)."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    found = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
                                  sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200, offset=0)
    return {run.name.rsplit("-", 1)[0]: run for run in found}


def log_messages(client: Any, flow_run_id: UUID) -> list[str]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200, offset=0,
                            sort=LogSort.TIMESTAMP_ASC)
    messages = [log.message for log in logs]
    while len(logs) == 200:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200,
                                offset=len(messages), sort=LogSort.TIMESTAMP_ASC)
        messages += [log.message for log in logs]
    return messages


def artifacts(client: Any, flow_run_id: UUID) -> dict[str, Any]:
    """{artifact key: its latest version} created by one flow run, in its tasks or the flow itself.
    (A raw request: client.read_artifacts always sends a task-run filter, which leaves out the
    artifacts a flow creates outside its tasks.)"""
    from prefect.client.schemas.objects import Artifact

    response = client.request("POST", "/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [str(flow_run_id)]}},
        "sort": "CREATED_DESC", "limit": 200, "offset": 0})
    response.raise_for_status()
    latest: dict[str, Any] = {}
    for artifact in Artifact.model_validate_list(response.json()):
        latest.setdefault(artifact.key, artifact)
    return latest


def table_rows(data: Any) -> list[dict[str, Any]]:
    """A table artifact's rows (the API returns them as a JSON string)."""
    import json

    return json.loads(data) if isinstance(data, str) else data


def flush_logs() -> None:
    """Send the log records this process has queued for the API (they go in batches)."""
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)


def is_rank(proc: Any) -> bool:
    try:
        return "ganpipe.train" in proc.cmdline() and "accelerate.commands.launch" not in " ".join(proc.cmdline())
    except Exception:  # noqa: BLE001 - gone meanwhile
        return False


def alive(procs: list[Any]) -> list[Any]:
    return [p for p in procs if process_running(p)]


def wait_for(condition: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    """One temporary Prefect API (a subprocess server on 127.0.0.1) for this module's tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def client(prefect_api: None) -> Iterator[Any]:
    from prefect import get_client

    with get_client(sync_client=True) as c:
        yield c


@pytest.fixture
def tiny_config(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", TINY_DIGITS)


@pytest.fixture
def in_background() -> Iterator[Callable[[Callable[[], None]], None]]:
    """Run a helper beside the flow (which runs in this, the main, thread); re-raise its errors."""
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []

    def start(fn: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        threads.append(thread)

    yield start
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]


# --- ingest --------------------------------------------------------------------------------------

@flow
def ingest_flow(config_path: str, overrides: list[str]) -> dict[str, Any]:
    return ingest_task(config_path, overrides)


def test_unchanged_dataset_is_prepared_once_across_flow_runs(client: Any, tiny_config: Path) -> None:
    first = ingest_flow(str(tiny_config), [])
    prepared = sorted(p for p in Path(first["location"]).rglob("*") if p.is_file())
    stamps = {p: p.stat().st_mtime_ns for p in prepared}
    second = ingest_flow(str(tiny_config), [])
    assert (first["cached"], second["cached"]) == (False, True)
    assert second["fingerprint"] == first["fingerprint"] and second["location"] == first["location"]
    assert second["num_records"] == first["num_records"] == 1797
    assert {p: p.stat().st_mtime_ns for p in prepared} == stamps, "a cache hit must not rewrite prepared data"
    # Other preprocessing is another fingerprint, prepared anew.
    resized = ingest_flow(str(tiny_config), ["data.resolution=8"])
    assert resized["cached"] is False and resized["fingerprint"] != first["fingerprint"]


# --- failures: named stage, no retry of bad input, retry of a transient storage failure ---------

def test_bad_input_fails_the_named_stage_and_is_not_retried(client: Any, tiny_config: Path,
                                                            tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    state = training_pipeline(str(tiny_config), [f"data.source={missing}"], return_state=True)
    assert state.is_failed() and "ingest failed: data.source" in state.message and str(missing) in state.message
    runs = task_runs(client, state.state_details.flow_run_id)
    assert set(runs) == {"ingest"}, "no later stage may start"
    assert runs["ingest"].state.is_failed() and runs["ingest"].run_count == 1, "bad input is never retried"
    flush_logs()
    logs = log_messages(client, state.state_details.flow_run_id)
    assert any(m.startswith("stage ingest failed: data.source") for m in logs), logs

    # Evaluation settings that cannot work fail before any stage runs.
    for overrides, error in ((["register.primary_metric=kid"], "register.primary_metric: 'kid' is not among eval.metrics"),
                             (["eval.metrics=[fd_domain,fdd]"], "fdd"),
                             (["eval.metrics=[fd_domain,lpips]", "register.primary_metric=lpips"],
                              "register.primary_metric: lpips needs eval.lpips_weights")):
        state = training_pipeline(str(tiny_config), overrides, return_state=True)
        assert state.is_failed() and error in state.message, state.message
        assert task_runs(client, state.state_details.flow_run_id) == {}


def test_transient_storage_failure_is_retried(client: Any, tiny_config: Path, tiny_run: Path,
                                              s3: tuple[str, str], in_background: Any) -> None:
    """The export's bucket does not exist on the first attempt (a storage failure, not bad
    input); it appears while the task waits to retry, and the retry exports everything."""
    import boto3
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateName,
    )
    from prefect.client.schemas.sorting import TaskRunSort

    endpoint, existing = s3
    bucket = f"{existing}-later"
    s3_client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def create_bucket_once_the_export_awaits_retry() -> None:
        waiting = TaskRunFilter(state=TaskRunFilterState(name=TaskRunFilterStateName(any_=["AwaitingRetry"])))
        wait_for(lambda: [r for r in client.read_task_runs(task_run_filter=waiting, limit=10, offset=0,
                                                           sort=TaskRunSort.ID_DESC) if r.name.startswith("export")],
                 timeout=300, what="the export task to await its retry", every=0.1)
        s3_client.create_bucket(Bucket=bucket)

    in_background(create_bucket_once_the_export_awaits_retry)
    state = export_flow(str(tiny_config), ["export.num_images=40", "export.shard_size=16"], model_uri=str(tiny_run),
                        out=f"s3://{bucket}/synthetic", return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["num_images"] == 40 and result["num_shards"] == 3
    keys = sorted(o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket, Prefix="synthetic/")["Contents"])
    assert [k for k in keys if k.endswith(".parquet")] == [f"synthetic/data/{n}" for n in
                                                           ("train-00000-of-00003.parquet",
                                                            "train-00001-of-00003.parquet",
                                                            "train-00002-of-00003.parquet")], keys
    export_run = task_runs(client, state.state_details.flow_run_id)["export"]
    assert export_run.state.is_completed() and export_run.run_count >= 2, "the storage failure was retried"


def test_failed_evaluation_fails_the_flow_and_registers_nothing(client: Any, tiny_config: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """fid has no value without the Inception weights (none here: an empty torch hub cache), so
    the evaluate stage fails after training, and registration - which would record a version
    without an alias decision - never starts."""
    import mlflow

    from ganpipe import tracking

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    state = training_pipeline(str(tiny_config), ["eval.metrics=[fid]", "register.primary_metric=fid"],
                              return_state=True)
    assert state.is_failed() and "evaluate failed: fid has no value (needs the InceptionV3 FID weights" in \
        state.message, state.message
    runs = task_runs(client, state.state_details.flow_run_id)
    assert list(runs) == ["ingest", "train", "evaluate"]
    assert runs["train"].state.is_completed() and runs["evaluate"].state.is_failed()
    tracking.configure_mlflow()
    assert mlflow.MlflowClient().search_registered_models() == [], "nothing may be registered"
    flush_logs()
    assert any(m.startswith("stage evaluate failed: fid has no value")
               for m in log_messages(client, state.state_details.flow_run_id))


def test_no_value_for_the_primary_metric_is_a_failed_evaluation(tiny_config: Path) -> None:
    cfg = load_config(tiny_config)
    require_primary_metric(cfg, {"fd_domain": {"value": 1.5, "uncertainty": 0.1}})
    with pytest.raises(EvaluationFailed, match="fd_domain has no value \\(no reference data\\)"):
        require_primary_metric(cfg, {"fd_domain": {"value": None, "error": "no reference data"}})


# --- training: retry resumes, timeout kills the process tree --------------------------------------

@flow
def train_flow(config_path: str, overrides: list[str]) -> dict[str, Any]:
    return train_task.with_options(retry_delay_seconds=0)(config_path, overrides)


def test_training_retry_resumes_from_the_last_checkpoint(client: Any, tiny_config: Path,
                                                         in_background: Any) -> None:
    """The first attempt's rank is SIGKILLed (as by the OOM killer) after its first checkpoint;
    the task's retry continues from the last checkpoint instead of starting over."""
    overrides = ["train.steps=100", "train.checkpoint_every=20", "train.log_every=20"]
    me = str(os.getpid())

    def kill_rank_after_first_checkpoint() -> None:
        rank = wait_for(lambda: [p for p in training_processes(GANPIPE_LAUNCHER_PID=me) if is_rank(p)],
                        timeout=300, what="the training rank")[0]
        run_dir = Path(rank.cmdline()[-1])
        wait_for(lambda: (run_dir / "checkpoints" / "step-00000020").is_dir(), timeout=300,
                 what="the first checkpoint")
        rank.send_signal(signal.SIGKILL)

    in_background(kill_rank_after_first_checkpoint)
    state = train_flow(str(tiny_config), overrides, return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    resumed = result["resumed_from_step"]
    assert result["steps"] == 100 and resumed and resumed % 20 == 0 and 20 <= resumed < 100, result
    train_run = task_runs(client, state.state_details.flow_run_id)["train"]
    assert train_run.run_count == 2
    flush_logs()
    logs = log_messages(client, state.state_details.flow_run_id)
    assert f"resumed from step {resumed}" in logs
    assert any(m.startswith("step 100/100 ") for m in logs), "the trainer's lines stream into the run log"
    progress = artifacts(client, state.state_details.flow_run_id)["ganpipe-training-progress"]
    assert progress.type == "progress" and progress.data == 100.0
    assert progress.description.startswith("step 100/100 · ") and "images/s" in progress.description


def test_flow_timeout_kills_the_whole_training_process_tree(client: Any, tiny_config: Path,
                                                            in_background: Any) -> None:
    """When the flow run's timeout fires mid-training, every training process is gone by the
    time the flow run has finished (TimedOut)."""
    from prefect._internal.concurrency.cancellation import AlarmCancelScope

    me = str(os.getpid())
    seen: list[Any] = []
    ranks: list[Any] = []

    def fire_the_timeout_once_training_runs() -> None:
        wait_for(lambda: any(is_rank(p) for p in training_processes(GANPIPE_LAUNCHER_PID=me)), timeout=300,
                 what="the training rank")
        time.sleep(2.0)  # into the training loop
        seen.extend(training_processes(GANPIPE_LAUNCHER_PID=me))
        ranks.extend(p for p in seen if is_rank(p))
        # The flow's timeout is Prefect's SIGALRM timer (AlarmCancelScope); fire it now rather than
        # guessing how long this machine needs to start training.
        handler = signal.getsignal(signal.SIGALRM)
        assert getattr(handler, "__func__", None) is AlarmCancelScope._sigalarm_to_error, handler
        signal.setitimer(signal.ITIMER_REAL, 0.01)

    in_background(fire_the_timeout_once_training_runs)
    timed = training_pipeline.with_options(timeout_seconds=3600)
    state = timed(str(tiny_config), ["train.steps=1000000", "train.log_every=5"], return_state=True)
    assert state.name == "TimedOut", (state.name, state.message)
    assert ranks, "the rank was running"  # one local process: no launcher between the flow and it
    assert alive(seen) == [], f"survived the timeout: {[p.pid for p in alive(seen)]}"
    assert training_processes(GANPIPE_LAUNCHER_PID=me) == []


# --- the evaluation and export flows ------------------------------------------------------------

def test_evaluation_and_export_flows_with_artifacts(client: Any, tiny_config: Path, tiny_run: Path,
                                                    tmp_path: Path) -> None:
    """Evaluate a run, register it (champion), then export from the champion by default."""
    import datasets

    from ganpipe.registry import register_run

    run = shutil.copytree(tiny_run, tmp_path / tiny_run.name)  # the shared run stays untouched
    state = evaluation_flow(str(tiny_config), [], model_uri=str(run), return_state=True)
    assert state.is_completed(), state.message
    fd = state.result()["metrics"]["fd_domain"]
    assert fd["value"] > 0 and fd["uncertainty"] > 0
    found = artifacts(client, state.state_details.flow_run_id)
    assert found["ganpipe-metrics"].type == "table"
    rows = table_rows(found["ganpipe-metrics"].data)
    assert [(r["metric"], r["value"], r["uncertainty"]) for r in rows] == [("fd_domain", fd["value"], fd["uncertainty"])]
    assert f"| fd_domain | {fd['value']:.4g} |" in found["ganpipe-evaluation"].data

    registered = register_run(run)
    assert registered["aliases"] == ["champion"]
    state = export_flow(str(tiny_config), ["export.num_images=50", "export.shard_size=32"], return_state=True)
    assert state.is_completed(), state.message
    exported = state.result()
    assert exported["model_uri"] == f"models:/tiny-digits/{registered['version']}"
    assert exported["out"].endswith(f"exports/tiny-digits/v{registered['version']}")
    files = sorted(str(p) for p in Path(exported["out"]).glob("data/*.parquet"))
    rows = datasets.load_dataset("parquet", data_files=files, split="train")
    assert rows.num_rows == 50 and sorted(rows["index"]) == list(range(50))
    summary = artifacts(client, state.state_details.flow_run_id)["ganpipe-export"].data
    assert exported["out"] in summary and "50 rows" in summary


def test_deploy_rejects_a_bad_schedule_naming_the_key() -> None:
    from flows.deploy import training_schedule
    from ganpipe.config import DeployConfig
    from ganpipe.errors import UserError

    assert training_schedule(DeployConfig()) is None
    schedule = training_schedule(DeployConfig(cron="0 3 * * *", timezone="Europe/Berlin"))
    assert (schedule.cron, schedule.timezone) == ("0 3 * * *", "Europe/Berlin")
    with pytest.raises(UserError, match=r"^deploy.cron: .*'every day'"):
        training_schedule(DeployConfig(cron="every day"))
    with pytest.raises(UserError, match=r"^deploy.timezone: .*'Mars/Olympus'"):
        training_schedule(DeployConfig(cron="0 3 * * *", timezone="Mars/Olympus"))


def test_prefect_yaml_declares_the_pipeline_and_export_deployments() -> None:
    """prefect.yaml (for `prefect deploy --all`) points at these flows with valid parameters,
    schedule and work pool."""
    import yaml
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import load_flow_from_entrypoint

    from ganpipe.config import DeployConfig
    from tests.conftest import ROOT

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    flows = {}
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        loaded = load_flow_from_entrypoint(f"{ROOT / path}:{name}")
        flows[loaded.name] = deployment
        loaded.validate_parameters(deployment["parameters"])
        assert load_config(ROOT / deployment["parameters"]["config_path"]).registry.name == deployment["name"]
        assert deployment["work_pool"]["name"] == DeployConfig().work_pool
        for schedule in deployment.get("schedules") or []:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert set(flows) == {training_pipeline.name, export_flow.name}
    assert flows[training_pipeline.name]["schedules"] and not flows[export_flow.name].get("schedules")
