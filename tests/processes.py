"""Finding the processes a test started: the launcher and workers of one training run, by the
environment ganpipe.workers passes down (GANPIPE_LAUNCHER_PID, GANPIPE_FLOW_RUN_ID)."""

from __future__ import annotations

from contextlib import suppress

import psutil


def process_running(process: psutil.Process) -> bool:
    """Alive and not a zombie (a dead process waiting to be reaped holds nothing)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def training_processes(**env: str) -> list[psutil.Process]:
    """The running processes whose environment holds every `env` item, e.g.
    GANPIPE_LAUNCHER_PID=<pid> or GANPIPE_FLOW_RUN_ID=<id>."""
    found = []
    for process in psutil.process_iter():
        with suppress(psutil.Error):
            environ = process.environ()
            if all(environ.get(k) == v for k, v in env.items()) and process_running(process):
                found.append(process)
    return found
