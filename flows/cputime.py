"""CPU seconds of this process and every process it started (Ray's raylet and workers, a local
Prefect server, process pools), read from ``/proc`` (Linux).

``resource.getrusage`` counts this process and, with ``RUSAGE_CHILDREN``, only children that
have ended and been waited for; Ray workers live on under the raylet, a grandchild. Here every
live descendant counts its own time plus that of its children it has reaped, so work done in a
worker that ended is still counted by the process that reaped it. Elsewhere (no ``/proc``) only
this process and its reaped children are counted.
"""

from __future__ import annotations

import os
import resource
from typing import Callable

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, own CPU s, reaped children's CPU s) of ``pid``, None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) / _TICK for x in fields[11:15])
    return ppid, utime + stime, cutime + cstime


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_tree(root: int | None = None) -> dict[int, tuple[str, float, float]]:
    """pid -> (command line, own CPU s, reaped children's CPU s) for ``root`` (this process by
    default) and all its live descendants."""
    root = os.getpid() if root is None else root
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return {}
    stats = {p: s for p in pids if (s := _stat(p)) is not None}
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats and pid not in tree:
            tree[pid] = (_cmdline(pid), stats[pid][1], stats[pid][2])
            todo.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int | None = None, keep: Callable[[str], bool] | None = None) -> float:
    """CPU seconds so far of ``root`` and its descendants (with ``keep``: only the processes whose
    command line it accepts count their own time; reaped children count wherever they were reaped)."""
    tree = process_tree(root)
    if not tree:
        r, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime
    return sum((own if keep is None or keep(cmd) else 0.0) + reaped for cmd, own, reaped in tree.values())


class TreeCpuMeter:
    """CPU seconds of this process and its descendants over a span, processes that end within it
    included (to within ``interval`` each): the tree is sampled on a thread, and each process
    counts its own time from when the span began (or it started) to when it was last seen.
    Snapshots alone miss processes that end in the span and are not waited for by a process in
    the tree (a Ray Train worker group, stopped with its raylet, for one). A process that leaves
    the tree (orphaned, adopted by init) counts only while it was in it.

        with TreeCpuMeter() as m:
            ...
        m.seconds
    """

    def __init__(self, interval: float = 0.2) -> None:
        import threading

        self.interval, self.seconds = interval, 0.0
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-cpu-meter", daemon=True)

    def _sample(self, start: bool = False) -> None:
        for pid, (_, own, _) in process_tree().items():
            self._first.setdefault(pid, own if start else 0.0)
            self._last[pid] = own

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "TreeCpuMeter":
        self._sample(start=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.seconds = sum(self._last[p] - self._first[p] for p in self._last)
