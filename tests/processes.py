"""Processes and servers tests deal with: servers a test starts and stops (`start_logged`,
`stop_process`), finding the processes a test started (the launcher and workers of one training
run, by the environment ganpipe.workers passes down: GANPIPE_LAUNCHER_PID, GANPIPE_FLOW_RUN_ID),
and a silent endpoint that accepts connections and never answers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from contextlib import suppress
from pathlib import Path

import psutil


def start_logged(cmd: list[str], env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """A server for the length of a test module, its output in `log` for the failure message."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, so a server shuts down cleanly; SIGKILL when it has not within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


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


def crash_after_checkpoint(command: list[str], env: dict[str, str], checkpoint_dir: Path,
                           timeout: float = 300) -> None:
    """Start `command` (a `ganpipe train`) in a session of its own; once `checkpoint_dir` exists,
    SIGKILL the launcher and every one of its workers at once, as a machine crash would (the
    workers run in sessions of their own: they are found by GANPIPE_LAUNCHER_PID, by pid)."""
    proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + timeout
        while not checkpoint_dir.exists():
            assert time.time() < deadline and proc.poll() is None, f"training never wrote {checkpoint_dir.name}"
            time.sleep(0.05)
        workers = training_processes(GANPIPE_LAUNCHER_PID=str(proc.pid))
        assert workers, "no training processes found"
        os.killpg(proc.pid, signal.SIGKILL)
        for worker in workers:
            with suppress(psutil.Error):
                worker.kill()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


# --- commands measured in a process of their own: exit code, stderr, seconds, peak memory ---------

MEASURE = """
import contextlib, importlib, io, json, resource, sys, time
from ganpipe import cli
for module in json.loads(sys.argv[1]):  # what the commands load anyway: part of the baseline
    importlib.import_module(module)

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

results = []
for argv in json.loads(sys.argv[2]):
    before, start, err = peak_mib(), time.monotonic(), io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.run(argv)
    results.append({"argv": argv, "code": code, "stderr": err.getvalue(), "seconds": time.monotonic() - start,
                    "peak_growth_mib": peak_mib() - before})
print(json.dumps(results))
"""


def measured_commands(commands: list[list[str]], preload: list[str], env: dict[str, str] | None = None,
                      timeout: int = 300) -> list[dict]:
    """Run `ganpipe ARGV` for each of `commands`, one after the other in one fresh process (after
    importing `preload`), and return per command its exit `code`, `stderr`, `seconds` and
    `peak_growth_mib`: how far the process's peak RSS (getrusage ru_maxrss) rose during it. An
    allocation of X MiB shows as at least X minus the headroom between the RSS before the command
    and the peak so far, so a command that allocates gigabytes cannot hide behind the megabytes of
    earlier ones."""
    import json
    import sys

    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(preload), json.dumps(commands)],
                         capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers: the endpoint that
    hangs a client without timeouts (a stuck proxy, a firewalled load balancer, a frozen server).
    Runs in a thread of the test process; connections are held open until `close`."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.sock.settimeout(0.2)  # so the accept loop notices `close`
        self.port: int = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.accepted: list[socket.socket] = []
        self.accepted_at: list[float] = []  # time.monotonic() of each connection
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # the listening socket was closed
                return
            self.accepted_at.append(time.monotonic())
            self.accepted.append(conn)  # held, never read from or written to

    def connections(self, settle_s: float = 0.3) -> int:
        """Connections accepted so far, once those still in the kernel's queue have been taken."""
        time.sleep(settle_s)
        return len(self.accepted)

    def close(self) -> None:
        self._closed.set()
        self.sock.close()
        for conn in self.accepted:
            with suppress(OSError):
                conn.close()
        self._thread.join(timeout=5)
