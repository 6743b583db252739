"""Worker processes: every group of workers (training ranks, evaluation processes, export ranks)
is started, supervised and read here, the same way.

Launcher side, `run_workers`:
- the group runs as `accelerate launch ... --module MODULE ARGS` (one local process: the module
  itself, with the variables accelerate would give it) in a session of its own;
- its output goes to a log file (when given) and to a line callback or our stderr;
- cancelling (Ctrl-C, SIGTERM, a Prefect cancellation or timeout) kills the whole group and every
  descendant, every rank included;
- a failed group becomes one exception carrying the worker's own cause: UserError (exit 2) when
  a worker says its input is at fault, WorkerFailed (exit 1) otherwise. The worker's line says
  which, not the exit code: `accelerate launch` turns every failed rank into its own exit 1.

Worker side, `worker_main`:
- a watchdog thread kills the worker's process group as soon as the launcher is gone, even when
  it was SIGKILLed and could not clean up: no worker outlives the command that started it;
- a fatal error is reported as one line `worker input error: MESSAGE` and exit code 2 (input at
  fault) or `worker error: MESSAGE` and exit code 1. The traceback is written as
  `worker traceback: ` lines: the log keeps them, the terminal shows them only with
  GANPIPE_DEBUG=1, so the user reads one `error:` line;
- after a body that succeeded, the process group (if one was started) is destroyed before exit.
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
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import psutil

from ganpipe import storage, tracking
from ganpipe.errors import Failure, UserError

LineHandler = Callable[[str], None]

LAUNCHER_PID_ENV = "GANPIPE_LAUNCHER_PID"  # every worker's watchdog exits when this pid is gone
FLOW_RUN_ENV = "GANPIPE_FLOW_RUN_ID"  # lets a flow run's workers be found (and killed) by flow run
WORKER_ERROR = "worker error: "
WORKER_INPUT_ERROR = "worker input error: "  # a fatal error whose cause is the worker's input (exit 2)
WORKER_TRACEBACK = "worker traceback: "


class WorkerFailed(Failure):
    """A worker group failed for a reason that is not the user's input (exit 1)."""


# --- launcher side ---------------------------------------------------------------------------------

def worker_command(module: str, args: list[str], num_processes: int = 1, num_machines: int = 1,
                   mixed_precision: str = "no", accelerate_config: str | None = None
                   ) -> tuple[list[str], dict[str, str]]:
    """The command that starts the group, and the Accelerate variables it needs beyond our
    environment. One process on one machine without an Accelerate config file is
    `python -m MODULE ARGS` with the variables `accelerate launch` would set for it: its simple
    launcher does no more than that, and a launcher process between us and the worker costs a
    Python start and a torch import (about 3 s a command). Anything else is `accelerate launch`."""
    if num_processes == 1 and num_machines == 1 and not accelerate_config:
        # As accelerate's simple launcher sets them (accelerate.utils.launch), threads included:
        # it gives one worker OMP_NUM_THREADS=1 unless the caller set it.
        return [sys.executable, "-m", module, *args], {
            "ACCELERATE_MIXED_PRECISION": mixed_precision, "ACCELERATE_DYNAMO_BACKEND": "NO",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return accelerate_command(module, args, num_processes, num_machines, mixed_precision, accelerate_config), {}


def accelerate_command(module: str, args: list[str], num_processes: int = 1, num_machines: int = 1,
                       mixed_precision: str = "no", accelerate_config: str | None = None) -> list[str]:
    """`accelerate launch` of `python -m MODULE ARGS`, one process per device."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", accelerate_config]
    cmd += ["--num_processes", str(num_processes), "--num_machines", str(num_machines),
            "--mixed_precision", mixed_precision, "--dynamo_backend", "no"]
    if num_processes > 1:
        cmd += ["--multi_gpu"]  # torchrun-style launch; on CPU-only hosts the processes use gloo
    return [*cmd, "--module", module, *args]


def worker_env(num_processes: int, cpu: bool) -> dict[str, str]:
    """Our environment plus what every worker needs: the same GANPIPE_HOME, unbuffered output,
    the flow run (if any), CPU threads shared between the processes of one machine."""
    env = dict(os.environ)
    env["GANPIPE_HOME"] = str(storage.ganpipe_home())
    env.setdefault("PYTHONUNBUFFERED", "1")
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    flow_run = tracking.flow_run_id()
    if flow_run:
        env[FLOW_RUN_ENV] = flow_run
    if num_processes > 1 and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // num_processes))
    return env


def run_workers(module: str, args: list[str], *, what: str, num_processes: int = 1, num_machines: int = 1,
                mixed_precision: str = "no", accelerate_config: str | None = None, cpu: bool = False,
                on_line: LineHandler | None = None, log_file: Path | None = None, hold_fds: tuple[int, ...] = ()
                ) -> None:
    """Run MODULE ARGS in `num_processes` workers (`worker_command`) to the end. Raises UserError or
    WorkerFailed naming the workers' own cause when they fail; `what` names the work in messages
    ("training"). `hold_fds` (lock descriptors, ganpipe.locks) are inherited by the launched group,
    so a lock stays held until its last process is gone, even when we are killed first."""
    cmd, accelerate_env = worker_command(module, args, num_processes, num_machines, mixed_precision,
                                         accelerate_config)
    output = WorkerOutput(on_line, log_file)
    code = run_process_group(cmd, {**worker_env(num_processes, cpu), **accelerate_env}, output, hold_fds)
    if code == 0:
        return
    cause = output.last_error
    if output.input_error is not None or code == 2:  # another rank's later error is collateral damage
        raise UserError(output.input_error or cause or f"{what} rejected its input{output.see_log}")
    if cause:
        raise WorkerFailed(cause)
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    raise WorkerFailed(f"{what} {how}{output.see_log}")


class WorkerOutput:
    """Where the workers' lines go: all of them to the log file; to the terminal (or `on_line`)
    all but our error protocol's, and after a worker's fatal error only with GANPIPE_DEBUG=1 (what
    follows it is the launchers' tracebacks about the same failure)."""

    def __init__(self, on_line: LineHandler | None, log_file: Path | None):
        self.on_line, self.log_file = on_line, log_file
        self.debug = os.environ.get("GANPIPE_DEBUG") == "1"
        self.last_error: str | None = None
        self.input_error: str | None = None  # the first error a worker blamed on its input
        self.log = open(log_file, "a") if log_file else None  # noqa: SIM115 - closed by close()

    @property
    def see_log(self) -> str:
        return f" (see {self.log_file})" if self.log_file else ""

    def line(self, line: str) -> None:
        if self.log:
            self.log.write(line if line.endswith("\n") else line + "\n")
            self.log.flush()
        text = line.rstrip("\n")
        failed_before = self.last_error is not None
        if text.startswith(WORKER_ERROR):
            self.last_error = text.removeprefix(WORKER_ERROR)
        elif text.startswith(WORKER_INPUT_ERROR):
            self.last_error = text.removeprefix(WORKER_INPUT_ERROR)
            self.input_error = self.input_error or self.last_error
        protocol = text.startswith((WORKER_ERROR, WORKER_INPUT_ERROR, WORKER_TRACEBACK))
        if not self.debug and (protocol or failed_before):
            return
        if self.on_line:
            self.on_line(text)
        else:
            sys.stderr.write(text + "\n")

    def close(self) -> None:
        if self.log:
            self.log.close()


def run_process_group(cmd: list[str], env: dict[str, str], output: WorkerOutput, hold_fds: tuple[int, ...] = ()
                      ) -> int:
    """Run `cmd` in a new session, its lines to `output`; kill the whole group if we are
    interrupted. The children learn our pid (GANPIPE_LAUNCHER_PID), for their watchdog."""
    env = {**env, LAUNCHER_PID_ENV: str(os.getpid())}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, pass_fds=hold_fds, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace")
    try:
        with _sigterm_raises():
            for line in _output_lines(proc):
                output.line(line)
            return proc.wait()
    except BaseException:
        kill_group(proc)
        raise
    finally:
        output.close()


def _output_lines(proc: subprocess.Popen) -> Iterator[str]:
    """The child's output lines. A helper thread does the blocking reads, so this thread wakes up
    every 0.2 s: an exception Prefect injects into it (a timeout or cancellation delivered to a
    thread other than the main one) lands at once, not whenever a worker next prints."""
    assert proc.stdout is not None
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, name="ganpipe-worker-output", daemon=True).start()
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
    """Turn SIGTERM into an exception while workers run, so the group gets killed, unless
    someone already handles it: Prefect's flow engine raises its own TerminationSignal, and its
    cancellation handshake needs that handler to stay in place."""
    main_thread = threading.current_thread() is threading.main_thread()
    if not main_thread or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def kill_group(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """SIGTERM the child's process group and every descendant, then SIGKILL whatever is left after
    `grace` seconds. Descendants are named one by one because torchrun starts each rank of a
    multi-process run in a session of its own, outside the group."""
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
            if not any(_running(m) for m in members):
                return
            time.sleep(0.05)


def _group_and_tree(pid: int) -> tuple[int, list[psutil.Process]]:
    """The process group of `pid` and the processes in it or descending from it."""
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


def _running(process: psutil.Process) -> bool:
    """Alive and not a zombie (a dead process waiting to be reaped holds nothing)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- worker side -----------------------------------------------------------------------------------

def worker_main(body: Callable[[], Any]) -> int:
    """Run one worker's `body` under the protocol above; returns the exit code."""
    stop_with_launcher()
    try:
        body()
    except UserError as exc:
        report_error(exc, input_at_fault=True)
        return 2
    except Failure as exc:  # its message already says what went wrong
        report_error(exc)
        return 1
    except Exception as exc:  # noqa: BLE001 - the worker's last line of defence: one line, exit 1
        report_error(exc, with_type=True)
        return 1
    # A process group left to interpreter shutdown can abort its rank ("terminate called without
    # an active exception" from gloo's threads, SIGABRT) after the work succeeded, and the launcher
    # then reports the whole command failed. Seen once in a 2-process evaluation.
    import torch.distributed as dist  # here: the launcher side of this module never loads torch

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


def report_error(exc: BaseException, with_type: bool = False, input_at_fault: bool = False) -> None:
    """The protocol's lines for a fatal error: the traceback (kept in the log), then the cause."""
    for line in traceback.format_exception(exc):
        for part in line.rstrip("\n").splitlines():
            print(f"{WORKER_TRACEBACK}{part}", file=sys.stderr)
    message = f"{type(exc).__name__}: {exc}" if with_type else str(exc)
    prefix = WORKER_INPUT_ERROR if input_at_fault else WORKER_ERROR
    print(f"{prefix}{' '.join(message.split())}", file=sys.stderr, flush=True)


def stop_with_launcher() -> None:
    """A daemon thread that kills this worker's process group as soon as the launching process
    (GANPIPE_LAUNCHER_PID) is gone. Does nothing when the worker was not started by run_workers."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher and launcher.isdigit():
        threading.Thread(target=_exit_with, args=(int(launcher),), name="ganpipe-launcher-watchdog",
                         daemon=True).start()


def _exit_with(pid: int) -> None:
    _wait_for_exit(pid)
    with suppress(OSError):  # nobody may read our output any more
        print(f"{WORKER_ERROR}the process that started this worker (pid {pid}) is gone; stopping",
              file=sys.stderr, flush=True)
    os.killpg(os.getpgrp(), signal.SIGKILL)


def _wait_for_exit(pid: int) -> None:
    """Block until `pid` has exited. A pidfd (Linux) sees the exit itself, so neither an unreaped
    zombie nor a reused pid can fool it; elsewhere, poll."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):
        with suppress(psutil.NoSuchProcess):
            process = psutil.Process(pid)
            while _running(process):
                time.sleep(1.0)
        return
    select.select([fd], [], [])
