"""Connect to Ray once per process: the cluster in ``RAY_ADDRESS`` if one is named, else a local one.

Scoring, resharding and training all start Ray through :func:`ensure_ray`, so a process that
does several of them shares one connection, and an address nothing listens on fails at once
instead of after Ray's minutes of retries.
"""

from __future__ import annotations

import os
import socket
from typing import Any


def ensure_ray(num_cpus: int | None = None, address: str | None = None) -> None:
    """``ray.init`` once: the cluster in ``address``/``RAY_ADDRESS`` if set, else a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "ignore_reinit_error": True}
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, **kwargs)
        except Exception as e:  # noqa: BLE001
            raise ConnectionError(f"cannot reach the Ray cluster at {address}: {e}") from e
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)


def check_reachable(address: str, timeout: float = 3.0) -> None:
    """Fail at once on a Ray address nothing listens on (ray.init would retry for minutes)."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        return  # let Ray interpret unusual forms itself
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise ConnectionError(f"cannot reach the Ray cluster at {address}: {e}") from None
