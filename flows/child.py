"""Run one function in a child process beside the flow, its progress lines relayed as they come.

The demo trains its DFN filter and its DeltaLoss proxies side by side, one torch thread each:
two tiny models on 2 cores train faster as two single-threaded processes than one after the
other on two threads each (measured on the shared 2-core machine at load ~8: the DFN filter's
first 20 steps took 11.7 CPU s on one thread, 51 CPU s on two). Threads in the flow's process
would share its GIL and its one torch thread pool, so the second job gets a process of its own
(``spawn``: a clean interpreter, no forked Ray or Prefect state).

``concurrent.futures.ProcessPoolExecutor`` returns results and exceptions but has no channel
for progress, which the flow logs while the job runs; a pipe carries both here. The function
must be importable (``module:name``) and take an ``info`` callback for its progress lines.
"""

from __future__ import annotations

import importlib
import multiprocessing
import traceback
from typing import Any, Callable


def _child(conn: Any, target: str, kwargs: dict[str, Any], threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    module, name = target.split(":")
    try:
        fn = getattr(importlib.import_module(module), name)
        result = fn(**kwargs, info=lambda msg: conn.send(("info", str(msg))))
        conn.send(("result", result))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class ChildFailed(RuntimeError):
    pass


class Child:
    """``Child("pkg.mod:fn", threads=1, **kwargs)`` starts ``fn(**kwargs, info=...)`` in a spawned
    process; ``result(info)`` relays its progress lines to ``info`` and returns what it returned
    (or raises ``ChildFailed`` with its traceback, or when it died without answering)."""

    def __init__(self, target: str, threads: int = 1, **kwargs: Any) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=False)
        self.target = target
        self._proc = ctx.Process(target=_child, args=(child_conn, target, kwargs, threads), name=target, daemon=True)
        self._proc.start()
        child_conn.close()

    def result(self, info: Callable[[str], None] = print) -> Any:
        try:
            while True:
                try:
                    kind, payload = self._conn.recv()
                except EOFError:
                    self._proc.join()
                    raise ChildFailed(f"{self.target} ended without a result (exit code {self._proc.exitcode})") from None
                if kind == "info":
                    info(payload)
                elif kind == "error":
                    raise ChildFailed(f"{self.target} failed: {payload}")
                else:
                    return payload
        finally:
            self._conn.close()
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.kill()

    def cancel(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
        self._proc.join()
