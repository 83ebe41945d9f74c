"""Two curate runs to the same output: the second is refused at once, naming the first, and
writes nothing; a holder killed with SIGKILL leaves no stale lock behind (locally)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from curation.data.outlock import OutputLockedError, output_lock

HOLD = """
import sys, time
from curation.data.outlock import output_lock
with output_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_second_run_to_the_same_out_is_refused(tmp_path):
    from curation.selection.curate import curate

    out = tmp_path / "curated"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=rf"{out} is being written by another curate run: pid {holder.pid}"):
            curate(str(tmp_path / "work"), {"defaults": [{"rule": "valid"}]}, str(out))
        assert sorted(os.listdir(out)) == [".curate.lock"]  # nothing half-written
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with output_lock(str(out)):  # the kernel released the killed holder's lock
        pass


def test_cli_reports_the_lock(tmp_path):
    from typer.testing import CliRunner

    from curation.app.cli import app

    out = tmp_path / "curated"
    with output_lock(str(out)):
        # the same process holds it through another descriptor: flock refuses that too
        r = CliRunner().invoke(app, ["reshard", "--policy", str(tmp_path / "p.yaml"), "--out", str(out),
                                     "--work", str(tmp_path / "work")])
    assert r.exit_code == 2 and "being written by another curate run" in r.output


@pytest.mark.s3
def test_s3_lock_is_exclusive(s3_bucket):
    out = f"{s3_bucket}/curated"
    with output_lock(out):
        with pytest.raises(OutputLockedError, match=r"remove s3://.*/curated/\.curate\.lock"):
            with output_lock(out):
                pass
    with output_lock(out):  # released on exit
        pass
