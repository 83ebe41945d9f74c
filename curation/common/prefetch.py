"""Run an iterator on a helper thread, a few items ahead of its consumer.

The scoring engine uses it so that reading and decoding a shard overlaps the model; the
trainer so that building batches overlaps the training step. Exceptions raised on the thread
are re-raised in the consumer; closing the consumer stops the thread.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterable, Iterator


def prefetch(items: Iterable[Any], depth: int = 2, name: str = "prefetch", join_timeout: float = 30.0) -> Iterator[Any]:
    q: queue.Queue = queue.Queue(maxsize=depth)
    end = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for x in items:
                while not stop.is_set():
                    try:
                        q.put(x, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(end)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            q.put(e)

    t = threading.Thread(target=work, name=name, daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is end:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        t.join(timeout=join_timeout)  # let the worker finish its item: no thread left running into shutdown
