"""One writer per output folder: a second curate run to the same ``out`` is refused, clearly.

Locally the lock is an ``flock`` on ``<out>/.curate.lock``: the kernel releases it when the
holder exits, even on ``kill -9``, so a crashed run never leaves a stale lock (the file may stay;
it is the flock that counts). On S3 the lock
is an object created with ``If-None-Match: *`` (an exclusive create); a run that was killed
leaves it behind, and the refusal names it so that it can be removed once no run is active.
The lock file says who holds it (host, pid, start time, command).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from contextlib import contextmanager
from typing import Any, Iterator

from curation.data import storage

LOCK_NAME = ".curate.lock"


class OutputLockedError(RuntimeError):
    """Another run is writing to the same output folder."""


def _holder(token: str = "") -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": " ".join(sys.argv)[:300]}


def _describe(raw: bytes) -> str:
    try:
        h = json.loads(raw.decode())
        return f"pid {h['pid']} on {h['host']} since {h['since']} ({h['command']})"
    except (ValueError, KeyError, UnicodeDecodeError):
        return "an unknown run"


@contextmanager
def output_lock(out: str, storage_options: dict[str, Any] | None = None) -> Iterator[None]:
    """Hold the lock on ``out`` for the block; raise ``OutputLockedError`` at once if it is taken."""
    url = storage.join(out, LOCK_NAME)
    if storage.is_remote(out):
        with _object_lock(url, storage_options):
            yield
        return
    created = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    fd = _locked_fd(url, out)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        yield
    finally:
        os.unlink(url)  # while still holding it: a run that opened the old file re-checks (see _locked_fd)
        os.close(fd)
        if created and not os.listdir(out):
            os.rmdir(out)  # a refused run leaves no trace


def _locked_fd(url: str, out: str) -> int:
    import fcntl

    while True:
        fd = os.open(url, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise OutputLockedError(f"{out} is being written by another curate run: {who}; wait for it to finish") from None
        try:
            if os.stat(url).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed this file as we locked it: take the new one


def _ours(raw: bytes, token: str) -> bool:
    try:
        return json.loads(raw.decode()).get("token") == token
    except (ValueError, UnicodeDecodeError, AttributeError):
        return False


@contextmanager
def _object_lock(url: str, storage_options: dict[str, Any] | None) -> Iterator[None]:
    fs, path = storage.get_fs(url, storage_options)
    token = uuid.uuid4().hex
    try:
        fs.pipe_file(path, json.dumps(_holder(token)).encode(), mode="create")
    except (FileExistsError, OSError) as e:
        if not isinstance(e, FileExistsError) and "PreconditionFailed" not in str(e) and "412" not in str(e):
            raise
        try:
            raw = fs.cat_file(path)
            who = _describe(raw)
        except OSError:
            raw, who = b"", "an unknown run"
        if not _ours(raw, token):  # else: our create took effect but its answer was lost, and the retry met it
            raise OutputLockedError(f"{storage.dirname(url)} is being written by another curate run: {who}. If no run is "
                                    f"active (a killed run leaves its lock), remove {url}") from None
    try:
        yield
    finally:
        fs.rm_file(path)
