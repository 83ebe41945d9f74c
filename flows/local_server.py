"""Where a flow run started from the CLI records itself, when no Prefect server is configured.

With ``PREFECT_API_URL`` set (in the environment or the active profile) flows report to that
server and nothing here applies. Without it Prefect starts a temporary ("ephemeral") server
for the run. Started plainly, that server failed first runs on a 2-core machine, for three
reasons found in Prefect 3.8's code and in our runs:

1. **Start-up timeout.** On a fresh ``HOME`` the server first migrates a new SQLite database
   (measured here: 5.6 s on a quiet 2-core machine, 34 s at load average 6) and registers block types, all while
   the client waits at most ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` (20 s), counting
   only its sleeps. On timeout the client gives up but does not stop the server, which goes on
   migrating: the next start then meets a database that server holds.
2. **Telemetry's read-then-write transaction.** The server's telemetry heartbeat reads its
   session row and then inserts it in one *deferred* SQLite transaction. When another
   connection writes in between (start-up writes do), SQLite cannot upgrade the read snapshot
   and answers ``database is locked`` at once; the busy timeout does not apply to that case.
   It also tries to reach the internet, which this service never needs.
3. **One database for every run.** Every run of every process shares ``~/.prefect/prefect.db``:
   two runs starting together both migrate and write it.

So ``local_prefect(state_dir)`` gives the run its own database in ``state_dir`` (the demo's
output folder), migrates it before any server starts (a plain step with no timeout, that says
what it does), turns telemetry off, and keeps a start-up bound that covers a loaded machine.
Settings the user set explicitly are left as they are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

STARTUP_TIMEOUT_S = 120  # the server starts in ~3 s once migrated; the bound is for a loaded machine
_USER_SET = ("PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_DATABASE_CONNECTION_URL")


def configured_api_url() -> str | None:
    from prefect.settings import get_current_settings

    return get_current_settings().api.url


@contextmanager
def local_prefect(state_dir: str, info: Callable[[str], None] = print,
                  meanwhile: Callable[[], None] | None = None) -> Iterator[str]:
    """Run the enclosed flows on the configured server, or on a temporary one whose database
    lives in ``state_dir``. Yields where runs are recorded (an API URL or a database URL).
    ``meanwhile()`` (the caller's own preparation) runs while the database migrates, or first."""
    from prefect.settings import (
        PREFECT_API_DATABASE_CONNECTION_URL,
        PREFECT_SERVER_ANALYTICS_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    api = configured_api_url()
    if api:
        if meanwhile is not None:
            meanwhile()
        yield api
        return
    updates: dict = {}
    if not any(os.environ.get(k) for k in _USER_SET):
        os.makedirs(state_dir, exist_ok=True)
        updates[PREFECT_API_DATABASE_CONNECTION_URL] = \
            f"sqlite+aiosqlite:///{os.path.join(os.path.abspath(state_dir), 'prefect.db')}"
    if "PREFECT_SERVER_ANALYTICS_ENABLED" not in os.environ:
        updates[PREFECT_SERVER_ANALYTICS_ENABLED] = False
    if "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" not in os.environ:
        updates[PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS] = STARTUP_TIMEOUT_S
    with temporary_settings(updates=updates):
        settings = get_current_settings()
        db_url = settings.server.database.connection_url.get_secret_value() \
            if hasattr(settings.server.database.connection_url, "get_secret_value") \
            else str(settings.server.database.connection_url)
        migrate(settings.to_environment_variables(exclude_unset=True), info, meanwhile)
        yield db_url


def migrate(settings_env: dict[str, str], info: Callable[[str], None] = print,
            meanwhile: Callable[[], None] | None = None) -> None:
    """Bring the run's Prefect database up to date, in a child process with no start-up race;
    ``meanwhile()`` runs here while it works (the child takes one core for ~10 s)."""
    env = {**os.environ, **settings_env}
    t0 = time.time()
    with subprocess.Popen([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as child:
        try:
            if meanwhile is not None:
                meanwhile()
        finally:
            output, _ = child.communicate()
    if child.returncode != 0:
        raise RuntimeError("could not prepare Prefect's database for this run:\n" + output[-2000:])
    info(f"Prefect database ready in {time.time() - t0:.1f} s")
