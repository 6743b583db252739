"""Start training as `accelerate launch` subprocesses and wait for them.

The child runs in its own process group: cancelling (Ctrl-C, SIGTERM, a Prefect cancellation or
timeout) kills the whole group and every descendant, every rank included. Its output is passed
through, or handed line by line to a callback (the Prefect task streams it into the run log).

If the launching process dies without cleaning up (SIGKILL, OOM killer), each training rank
notices through a watchdog thread (`stop_with_launcher`, started by `ganpipe.train`) and takes
its process group down with it: no training process outlives the process that launched it.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ganpipe import runs, storage
from ganpipe.config import Config
from ganpipe.data import IngestResult, ingest, open_prepared
from ganpipe.errors import Failure, UserError

LineHandler = Callable[[str], None]

# The pid of the process that launched training; every rank's watchdog exits when it is gone.
LAUNCHER_PID_ENV = "GANPIPE_LAUNCHER_PID"


class TrainingFailed(Failure):
    pass


# Worker processes report their fatal error with this prefix; the launcher turns the last one into
# the command's single `error:` line (a bare `error:` from a worker would print twice).
WORKER_ERROR = "worker error: "


def report_worker_error(exc: BaseException) -> None:
    print(f"{WORKER_ERROR}{exc}", file=sys.stderr, flush=True)


def accelerate_command(cfg: Config, module: str, args: list[str]) -> list[str]:
    t = cfg.train
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if t.accelerate_config:
        if not Path(t.accelerate_config).is_file():
            raise UserError(f"train.accelerate_config: file not found: {t.accelerate_config}")
        cmd += ["--config_file", t.accelerate_config]
    cmd += ["--num_processes", str(t.num_processes), "--num_machines", str(t.num_machines),
            "--mixed_precision", t.mixed_precision, "--dynamo_backend", "no"]
    if t.num_processes > 1:
        cmd += ["--multi_gpu"]  # torchrun-style launch; on CPU-only hosts the ranks use gloo
    cmd += ["--module", module, *args]
    return cmd


def child_env(cfg: Config) -> dict[str, str]:
    env = dict(os.environ)
    env["GANPIPE_HOME"] = str(storage.ganpipe_home())
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cfg.train.cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    from ganpipe import tracking

    flow_run = tracking.flow_run_id()
    if flow_run:
        env["GANPIPE_FLOW_RUN_ID"] = flow_run
    if cfg.train.num_processes > 1 and "OMP_NUM_THREADS" not in env:
        threads = max(1, (os.cpu_count() or 1) // cfg.train.num_processes)
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_process_group(cmd: list[str], env: dict[str, str], on_line: LineHandler | None = None,
                      log_file: Path | None = None) -> int:
    """Run `cmd` in a new session; stream its output; kill the whole group if we are interrupted.
    The children learn our pid (GANPIPE_LAUNCHER_PID), for `stop_with_launcher`."""
    stream = on_line is not None or log_file is not None
    env = {**env, LAUNCHER_PID_ENV: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE if stream else sys.stderr,
                            stderr=subprocess.STDOUT if stream else sys.stderr, text=stream, bufsize=1)
    log = open(log_file, "a") if log_file else None  # noqa: SIM115 - closed in finally
    try:
        with _sigterm_raises():
            if stream:
                for line in _output_lines(proc):
                    if log:
                        log.write(line)
                        log.flush()
                    if on_line:
                        on_line(line.rstrip("\n"))
                    else:
                        sys.stderr.write(line)
            return proc.wait()
    except BaseException:
        kill_group(proc)
        raise
    finally:
        if log:
            log.close()


def _output_lines(proc: subprocess.Popen) -> Iterator[str]:
    """The child's output lines. A helper thread does the blocking reads, so this thread wakes up
    every 0.2 s: an exception Prefect injects into it (a timeout or cancellation delivered to a
    thread other than the main one) lands at once, not whenever the trainer next prints."""
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="ganpipe-train-output", daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            continue
        if line is None:
            return
        yield line


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception while training runs, so the group gets killed, unless
    someone already handles it: Prefect's flow engine raises its own TerminationSignal, and its
    cancellation handshake needs that handler to stay in place."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the child's process group and every descendant, then SIGKILL whatever is left after
    `grace` seconds. Descendants are named one by one because torchrun starts each rank of a
    multi-process run in a session of its own, outside the group."""
    import psutil

    pgid, members = _group_and_tree(proc.pid)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        for member in members:
            with suppress(psutil.NoSuchProcess):
                member.send_signal(sig)  # psutil checks the pid was not reused meanwhile
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()  # reap our own child
            if not any(process_running(m) for m in members):
                return
            time.sleep(0.05)


def _group_and_tree(pid: int) -> tuple[int, list[Any]]:
    """The process group of `pid` and the processes in it or descending from it."""
    import psutil

    try:
        pgid, root = os.getpgid(pid), psutil.Process(pid)
        members = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except (ProcessLookupError, psutil.NoSuchProcess):
        return pid, []
    for other in psutil.process_iter():
        with suppress(ProcessLookupError, psutil.Error):
            if os.getpgid(other.pid) == pgid:
                members.setdefault(other.pid, other)
    return pgid, list(members.values())


def process_running(process: Any) -> bool:
    """Alive and not a zombie (a dead process waiting to be reaped holds nothing)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def training_processes(**env: str) -> list[Any]:
    """The running processes whose environment holds every `env` item - the launcher and ranks
    of one training run, found by what child_env passes down: GANPIPE_LAUNCHER_PID=<pid> or
    GANPIPE_FLOW_RUN_ID=<id>."""
    import psutil

    found = []
    for process in psutil.process_iter():
        with suppress(psutil.Error):
            environ = process.environ()
            if all(environ.get(k) == v for k, v in env.items()) and process_running(process):
                found.append(process)
    return found


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


# --- in each training rank -----------------------------------------------------------------------

def stop_with_launcher() -> None:
    """Called by each training rank: a daemon thread that kills this rank's process group as soon
    as the launching process (GANPIPE_LAUNCHER_PID) is gone - even when it was SIGKILLed and could
    not clean up. Does nothing when training was not started by `launch_training`."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and launcher.isdigit():
        threading.Thread(target=_exit_with, args=(int(launcher),), name="ganpipe-launcher-watchdog",
                         daemon=True).start()


def _exit_with(pid: int) -> None:
    _wait_for_exit(pid)
    with suppress(OSError):  # nobody may read our output any more
        print(f"{WORKER_ERROR}the process that launched training (pid {pid}) is gone; stopping", file=sys.stderr,
              flush=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _wait_for_exit(pid: int) -> None:
    """Block until `pid` has exited. A pidfd (Linux) sees the exit itself, so neither an unreaped
    zombie nor a reused pid can fool it; elsewhere, poll."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        while _pid_alive(pid):
            time.sleep(1.0)
        return
    select.select([fd], [], [])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@dataclass
class PreparedRun:
    run_dir: Path
    data: IngestResult


def prepare_run(cfg: Config, resume: str = "auto") -> PreparedRun:
    """Ingest (a cache hit when unchanged), choose the run directory, save the effective config,
    and check that the networks can be built for this data before any process starts."""
    from ganpipe.train import network_spec

    data = ingest(cfg.data, cfg.storage.endpoint_url)
    network_spec(cfg, open_prepared(data.location, cfg.storage.endpoint_url))
    run_dir = runs.run_dir_for(cfg, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(str(run_dir / "config.yaml"), cfg.to_yaml().encode())
    runs.update_info(run_dir, name=run_dir.name, identity=runs.run_identity(cfg), config_hash=cfg.hash(),
                     data={"fingerprint": data.fingerprint, "location": data.location,
                           "num_records": data.num_records, "classes": data.classes})
    return PreparedRun(run_dir, data)


def launch_training(cfg: Config, resume: str = "auto", on_line: LineHandler | None = None) -> dict[str, Any]:
    """`ganpipe train`: returns the contract's result (run_dir, steps, checkpoint, mlflow_run_id,
    resumed_from_step) or raises TrainingFailed naming the cause."""
    if cfg.train.mixed_precision == "fp16" and not _cuda_available() :
        raise UserError("train.mixed_precision: fp16 needs a GPU; use bf16 on CPU")
    prepared = prepare_run(cfg, resume)
    run_dir = prepared.run_dir
    (run_dir / "result.json").unlink(missing_ok=True)
    cmd = accelerate_command(cfg, "ganpipe.train", [str(run_dir)])
    code = run_process_group(cmd, child_env(cfg), on_line=on_line, log_file=run_dir / "train.log")
    result = runs.read_json(run_dir / "result.json")
    if code == 2:
        raise UserError(_last_error(run_dir / "train.log") or f"training rejected its input (see {run_dir}/train.log)")
    if result.get("status") == "diverged":
        raise TrainingFailed(result["error"])
    if code != 0 or result.get("status") != "completed":
        raise TrainingFailed(f"training exited with code {code}: "
                             f"{_last_error(run_dir / 'train.log') or 'see ' + str(run_dir / 'train.log')}")
    return result


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _last_error(log: Path) -> str | None:
    if not log.exists():
        return None
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if WORKER_ERROR in line:
            return line.split(WORKER_ERROR, 1)[1]
    for line in reversed(lines):
        if "Error" in line or "error" in line:
            return line
    return None
