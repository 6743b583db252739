"""Advisory locks: one writer at a time for a run directory, an export destination or the
embedded MLflow store.

A lock is `fcntl.flock` on a small file (`.ganpipe.lock` inside the folder it guards) that
records who holds it: pid, host, what they run, since when. The kernel releases a flock when
the last descriptor on it closes, so a holder that dies, even by SIGKILL, never leaves a lock
behind, and a stale file costs nothing. The file itself is never deleted: unlinking a lock file
while another process waits on it would let two holders in.

Local paths only: flock does not reach across machines on every network filesystem, and object
stores (S3) have no locks at all (see docs/contract.md for what ganpipe guarantees there).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ganpipe.errors import UserError

LOCK_FILE = ".ganpipe.lock"
READ_ATTEMPTS = 20  # a holder writes its details right after locking: a reader may be a moment early


class InUse(UserError):
    """Someone else holds the lock (exit 2: the user chose to start a second writer)."""


def holder_text(lock_file: Path) -> str:
    """'pid N on HOST (WHAT, since TIME)', or 'another process' when the file does not say."""
    for _ in range(READ_ATTEMPTS):
        try:
            info: dict[str, Any] = json.loads(lock_file.read_text())
            return f"pid {info['pid']} on {info['host']} ({info['command']}, since {info['since']})"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "another process"


def _same_file(fd: int, path: Path) -> bool:
    """Is the locked descriptor still the file at `path` (not one removed and recreated meanwhile)?"""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _acquire(lock_file: Path, subject: str, wait: bool, quiet: bool) -> int:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = holder_text(lock_file)
                if not wait:
                    raise InUse(f"{subject} is in use by {holder}; wait for it or pass --wait") from None
                if not quiet:
                    print(f"waiting for {subject}: in use by {holder}", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        if _same_file(fd, lock_file):
            return fd
        os.close(fd)  # the file was replaced while we waited: lock the one that is there now


@contextmanager
def hold(lock_file: Path, subject: str, command: str, *, wait: bool = False, quiet: bool = False) -> Iterator[int]:
    """Hold the lock in `lock_file` for the block; yields its descriptor (pass it to child processes
    that must keep holding it while they run). Raises InUse naming the holder, unless `wait`;
    `subject` is what the messages call the locked thing, `command` what we are doing there."""
    fd = _acquire(lock_file, subject, wait, quiet)
    try:
        details = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": command,
                              "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, details, 0)
        yield fd
    finally:
        os.close(fd)  # releases the flock


@contextmanager
def hold_folder(folder: Path, command: str, *, wait: bool = False) -> Iterator[int]:
    """`hold` the lock of a folder (created if missing): its own `.ganpipe.lock`."""
    with hold(folder / LOCK_FILE, str(folder), command, wait=wait) as fd:
        yield fd
