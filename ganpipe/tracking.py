"""MLflow location and run provenance: the embedded store by default, a real server when configured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ganpipe import storage


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI when set; else sqlite under GANPIPE_HOME."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{storage.ganpipe_home() / 'mlflow.db'}"


def is_embedded() -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI")


def configure_mlflow() -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if is_embedded():
        # The model registry lives in the same sqlite file.
        mlflow.set_registry_uri(tracking_uri())


def experiment_id(name: str) -> str:
    """The experiment's id, created on first use. In the embedded store its artifacts live under
    GANPIPE_HOME (MLflow would otherwise write ./mlruns beside whatever the working directory is)."""
    import mlflow

    configure_mlflow()
    existing = mlflow.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    location = (storage.ganpipe_home() / "mlartifacts").as_uri() if is_embedded() else None
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        existing = mlflow.get_experiment_by_name(name)  # created concurrently by another process
        if existing is None:
            raise
        return existing.experiment_id


def known_run(run_id: str | None) -> str | None:
    """`run_id` when this tracking store has that run, else None (a run directory trained
    against another store, or a store that was reset)."""
    if not run_id:
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    configure_mlflow()
    try:
        MlflowClient().get_run(run_id)
        return run_id
    except MlflowException:
        return None


def git_commit() -> str | None:
    """The commit of the checkout ganpipe runs from, when it is one (else None)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def flow_run_id() -> str | None:
    """The Prefect flow run this work belongs to: passed down to subprocesses in GANPIPE_FLOW_RUN_ID."""
    if os.environ.get("GANPIPE_FLOW_RUN_ID"):
        return os.environ["GANPIPE_FLOW_RUN_ID"]
    if "prefect" not in sys.modules:  # not inside a flow; importing prefect just to learn that is slow
        return None
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001 - outside a flow run there is simply none
        return None
