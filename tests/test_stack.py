"""The local stack (infra/local-stack, as `make stack` runs it) end to end: PostgreSQL from Debian's
packages, `prefect server` and `mlflow server` on it, moto's S3, all on 127.0.0.1; the pipeline on
a tiny config against them, with MLflow artifacts and the export in the bucket. Checked through
each server's own client and in the databases themselves. One stack serves the module and is
stopped at teardown, whatever happened."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import ROOT, TINY_DIGITS, free_port, last_json, run_cli, write_config

pytestmark = pytest.mark.slow

LOCAL_STACK = str(ROOT / "infra" / "local-stack")
SERVICES = ("postgres", "s3", "mlflow", "prefect")


@dataclass
class Stack:
    env: dict[str, str]  # how the test runs infra/local-stack
    exports: dict[str, str]  # what `start` printed: MLFLOW_TRACKING_URI, PREFECT_API_URL, AWS_*
    ports: dict[str, int]
    state: Path

    def client_env(self, **extra: str) -> dict[str, str]:
        return {**self.exports, **extra}

    def secret(self, name: str) -> str:
        lines = (self.state / "secrets.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)[name]


def local_stack(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([LOCAL_STACK, command], env=env, capture_output=True, text=True, timeout=900)


def parse_exports(stdout: str) -> dict[str, str]:
    lines = [line.removeprefix("export ") for line in stdout.splitlines() if line.startswith("export ")]
    return dict(line.split("=", 1) for line in lines)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def require_postgres() -> None:
    """CI installs the server (.ci/run); anywhere else a missing one fails loudly, never skips."""
    found = shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: apt-get install -y postgresql (as .ci/run does)")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    require_postgres()
    # Not under pytest's tmp dir (mode 700): run as root, Postgres runs as `postgres` and must reach it.
    root = Path(tempfile.mkdtemp(prefix="ganpipe-stack-"))
    root.chmod(0o755)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PREFECT_", "AWS_"))}
    ports = {name: free_port() for name in SERVICES}
    env = {**inherited, "PYTHON": sys.executable, "GANPIPE_STACK_DIR": str(root / "state"),
           "GANPIPE_STACK_MLFLOW_WORKERS": "1",
           **{f"GANPIPE_STACK_{name.upper()}_PORT": str(port) for name, port in ports.items()}}
    try:
        started = local_stack("start", env)
        assert started.returncode == 0, started.stderr[-5000:]
        yield Stack(env, parse_exports(started.stdout), ports, root / "state")
    finally:
        stopped = local_stack("stop", env)
        shutil.rmtree(root, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stderr[-3000:]


def bucket_objects(stack: Stack, prefix: str = "") -> dict[str, bytes]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=stack.exports["AWS_ENDPOINT_URL"], region_name="us-east-1",
                      aws_access_key_id=stack.exports["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=stack.exports["AWS_SECRET_ACCESS_KEY"])
    bucket = stack.exports["GANPIPE_BUCKET"]
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            for o in page.get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def query(stack: Stack, database: str, sql: str, *params: Any) -> list[tuple]:
    """Straight from Postgres, as the role that owns the database."""
    import psycopg

    password = stack.secret(f"{database.upper()}_DB_PASSWORD")
    with psycopg.connect(host="127.0.0.1", port=stack.ports["postgres"], dbname=database, user=database,
                         password=password, connect_timeout=10) as conn:
        return conn.execute(sql, params).fetchall()


def test_the_stack_listens_on_loopback_with_the_exports_it_printed(stack: Stack) -> None:
    p = stack.ports
    assert stack.exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{p['mlflow']}"
    assert stack.exports["PREFECT_API_URL"] == f"http://127.0.0.1:{p['prefect']}/api"
    assert stack.exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{p['s3']}"
    assert all(listening(port) for port in p.values())
    # Every listening socket of the stack's processes is on 127.0.0.1, nowhere else.
    for port in p.values():
        sockets = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        addresses = {line.split()[3].rsplit(":", 1)[0] for line in sockets.splitlines() if line.strip()}
        assert addresses == {"127.0.0.1"}, (port, sockets)
    # The exports are in the state directory too (private), and `env` prints them again.
    assert parse_exports((stack.state / "stack.env").read_text()) == stack.exports
    assert oct((stack.state / "secrets.env").stat().st_mode & 0o777) == "0o600"
    again = local_stack("env", stack.env)
    assert parse_exports(again.stdout) == stack.exports
    # No password on any command line.
    for secret in ("POSTGRES_PASSWORD", "PREFECT_DB_PASSWORD", "MLFLOW_DB_PASSWORD"):
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert stack.secret(secret) not in ps


def test_pipeline_against_the_stack(stack: Stack, tmp_path: Path, ganpipe_home: Path) -> None:
    import mlflow
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    config = write_config(tmp_path / "tiny.yaml", TINY_DIGITS)
    export_prefix = f"exports/tiny-{uuid.uuid4().hex[:8]}"
    bucket = stack.exports["GANPIPE_BUCKET"]
    result = run_cli("pipeline", str(config), "--set", "export.num_images=200", "--set", "export.shard_size=64",
                     "--set", f"export.out=s3://{bucket}/{export_prefix}",
                     "--set", "train.accelerate_config=configs/accelerate/cpu.yaml", "--json",
                     env=stack.client_env(PREFECT_HOME=str(tmp_path / "prefect")))
    assert result.returncode == 0, result.stderr[-4000:]
    summary = last_json(result.stdout)
    assert (summary["model_uri"], summary["version"], summary["aliases"]) == ("models:/tiny-digits/1", 1, ["champion"])

    # The registered model, through the tracking server (Postgres-backed).
    client = mlflow.MlflowClient(tracking_uri=stack.exports["MLFLOW_TRACKING_URI"],
                                 registry_uri=stack.exports["MLFLOW_TRACKING_URI"])
    version = client.get_model_version_by_alias("tiny-digits", "champion")
    assert version.version == "1" and version.run_id == summary["mlflow_run_id"]
    tags = version.tags
    assert tags["ganpipe.data_fingerprint"] == summary["data_fingerprint"]
    assert float(tags["ganpipe.metric.fd_domain"]) == pytest.approx(summary["metrics"]["fd_domain"]["value"])
    flow_run_id = tags["ganpipe.flow_run_id"]
    uuid.UUID(flow_run_id)
    history = client.get_metric_history(summary["mlflow_run_id"], "d_loss")
    assert [m.step for m in history] == [10, 20] and all(np.isfinite(m.value) for m in history)

    # Its artifacts are in the bucket, under the server's destination, the weights byte for byte.
    mlflow_objects = bucket_objects(stack, "mlflow/")
    [weights] = [key for key in mlflow_objects if key.endswith("/generator.safetensors")]
    assert hashlib.sha256(mlflow_objects[weights]).hexdigest() == tags["ganpipe.generator_sha256"]
    artifacts = {key.split("/artifacts/", 1)[-1] for key in mlflow_objects}
    assert {"registry/v1/model_card.md", "registry/v1/promotion.json", "registry/v1/samples.png"} <= artifacts
    assert json.loads(mlflow_objects[next(k for k in mlflow_objects if k.endswith("registry/v1/promotion.json"))])
    assert not (ganpipe_home / "mlartifacts").exists()

    # The export: parquet shards and a manifest in the bucket, read back through `datasets`.
    exported = bucket_objects(stack, export_prefix + "/")
    manifest = json.loads(exported[f"{export_prefix}/manifest.json"])
    assert [shard["rows"] for shard in manifest["shards"]] == [64, 64, 64, 8]
    assert summary["export"]["out"] == f"s3://{bucket}/{export_prefix}" and summary["export"]["num_shards"] == 4
    rows = load_export(stack, f"s3://{bucket}/{export_prefix}/data/*.parquet")
    assert len(rows) == 200 and sorted(r["index"] for r in rows) == list(range(200))
    assert len({r["seed"] for r in rows}) == 200
    assert np.asarray(rows[0]["image"]).shape == (16, 16)

    # The flow run, through the Prefect API (Postgres-backed): completed, every stage a task.
    with temporary_settings({PREFECT_API_URL: stack.exports["PREFECT_API_URL"]}), \
            get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(uuid.UUID(flow_run_id))
        assert flow_run.state.is_completed(), flow_run.state
        assert prefect.read_flow(flow_run.flow_id).name == "ganpipe-training-pipeline"
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])),
                                           sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=50)
        assert {t.name.rsplit("-", 1)[0] for t in task_runs if t.state.is_completed()} >= \
            {"ingest", "train", "evaluate", "register", "export"}

    # And in the databases themselves.
    assert query(stack, "prefect", "SELECT state_type FROM flow_run WHERE id = %s", flow_run_id) == [("COMPLETED",)]
    assert query(stack, "mlflow", "SELECT name, version FROM model_versions") == [("tiny-digits", 1)]
    assert query(stack, "mlflow", "SELECT alias, version FROM registered_model_aliases WHERE name = %s",
                 "tiny-digits") == [("champion", 1)]


def load_export(stack: Stack, pattern: str) -> list[dict[str, Any]]:
    """Every row, streamed from the bucket by `datasets` (as ingest reads S3 sources)."""
    import datasets

    options = {"key": stack.exports["AWS_ACCESS_KEY_ID"], "secret": stack.exports["AWS_SECRET_ACCESS_KEY"],
               "client_kwargs": {"endpoint_url": stack.exports["AWS_ENDPOINT_URL"], "region_name": "us-east-1"}}
    return list(datasets.load_dataset("parquet", data_files=pattern, storage_options=options, split="train",
                                      streaming=True))


def test_the_kubernetes_work_pool_takes_ganpipe_deployments(stack: Stack, tmp_path: Path) -> None:
    """The README's commands against this Prefect server: the server accepts the GPU template as
    is, and `ganpipe deploy` puts the pipeline on that pool (its job variables pass the template's
    schema), with flow runs asking for GPUs through `gpu_count`."""
    template = ROOT / "infra" / "k8s" / "work-pool-gpu.json"
    env = stack.client_env(PREFECT_HOME=str(tmp_path / "prefect"))
    created = subprocess.run([sys.executable, "-m", "prefect", "work-pool", "create", "ganpipe-k8s",
                              "--type", "kubernetes", "--base-job-template", str(template)],
                             env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
    assert created.returncode == 0, created.stdout[-2000:] + created.stderr[-2000:]
    [(pool_type, stored)] = query(stack, "prefect", "SELECT type, base_job_template FROM work_pool WHERE name = %s",
                                  "ganpipe-k8s")
    assert pool_type == "kubernetes" and stored == json.loads(template.read_text())

    config = write_config(tmp_path / "tiny.yaml", TINY_DIGITS)
    deployed = run_cli("deploy", str(config), "--set", "deploy.work_pool=ganpipe-k8s", "--json", env=env)
    assert deployed.returncode == 0, deployed.stderr[-3000:]
    assert last_json(deployed.stdout)["work_pool"] == "ganpipe-k8s"
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: stack.exports["PREFECT_API_URL"]}), \
            get_client(sync_client=True) as prefect:
        deployment = prefect.read_deployment_by_name("ganpipe-training-pipeline/tiny-digits")
        assert deployment.work_pool_name == "ganpipe-k8s"
        run = prefect.create_flow_run_from_deployment(deployment.id, job_variables={"gpu_count": 8})
        assert run.job_variables["gpu_count"] == 8
        prefect.delete_flow_run(run.id)  # no Kubernetes worker here to pick it up


def alive(pid_record: str) -> bool:
    """`PID STARTTIME` as the pid files hold it: is that very process still there?"""
    pid, started = pid_record.split()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[19] == started


def test_start_again_changes_nothing_and_stop_leaves_nothing(stack: Stack) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=stack.exports["MLFLOW_TRACKING_URI"])
    experiment = client.create_experiment(f"kept-{uuid.uuid4().hex[:8]}")
    pids = {name: (stack.state / "run" / f"{name}.pid").read_text() for name in ("s3", "mlflow", "prefect")}
    again = local_stack("start", stack.env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert parse_exports(again.stdout) == stack.exports
    assert {name: (stack.state / "run" / f"{name}.pid").read_text() for name in pids} == pids
    assert again.stderr.count("already running") == 3 and "postgres: starting" not in again.stderr
    assert local_stack("status", stack.env).returncode == 0

    stopped = local_stack("stop", stack.env)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert not any(listening(port) for port in stack.ports.values())
    assert not any(alive(record) for record in pids.values())
    status = local_stack("status", stack.env)
    assert status.returncode == 3 and status.stdout.count("stopped") == 4
    assert local_stack("stop", stack.env).returncode == 0  # stopping a stopped stack is fine

    # Started again (same ports), the servers find their data in Postgres.
    restarted = local_stack("start", stack.env)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert parse_exports(restarted.stdout) == stack.exports
    assert client.get_experiment(experiment).lifecycle_stage == "active"
