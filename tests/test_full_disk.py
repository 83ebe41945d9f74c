"""Scoring and resharding into a filesystem that fills up: a clear error naming the file, nothing
half-written visible, and once space is freed the resumed run's outputs equal a clean run's.

Two ways to fill a disk, each a real kernel error, no mock:

- ``tmpfs``: a 1 MiB tmpfs mounted for the test (needs root with CAP_SYS_ADMIN, as in this
  project's containers and CI), filled with a ballast file until only a few files' room is
  left, so the run fills it in its middle (ENOSPC); freeing space = deleting the ballast.
- ``fsize``: a process file-size limit (RLIMIT_FSIZE, ``ulimit -f``) below the size of the
  outputs, so every write past it fails with EFBIG (SIGXFSZ ignored, as CPython does); it works
  without privileges, and fills at the first file instead of the middle. Freeing = no limit.

The run under the full disk is a forked child (the limit and its failure stay in it); the
resume runs in this process.
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import resource
import signal
import subprocess
import traceback

import pyarrow.parquet as pq
import pytest
import yaml

from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
from curation.data.shards import dataset_of, list_shards
from curation.scoring.engine import ScorerSpec, ShardTask, score_local

POLICY = {"defaults": [{"rule": "valid"}]}
RESHARD_ARGS = ["--max-samples", "4", "--workers", "1"]


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A 48-pair corpus in 6 shards, scored and resharded with no fault: the reference."""
    from typer.testing import CliRunner

    from curation.app.cli import app

    root = tmp_path_factory.mktemp("fulldisk")
    synthesize(str(root / "corpus"), SynthConfig(seed=3, datasets=[DatasetSpec("pairs", "pair", 48, {}, 8)]))
    tasks = [ShardTask(u, dataset_of(u)) for u in list_shards(str(root / "corpus" / "pairs"))]
    assert not score_local(tasks, ScorerSpec("basic"), str(root / "work")).failed
    (root / "policy.yaml").write_text(yaml.safe_dump(POLICY))
    r = CliRunner().invoke(app, ["reshard", "--policy", str(root / "policy.yaml"), "--work", str(root / "work"),
                                 "--out", str(root / "out"), *RESHARD_ARGS])
    assert r.exit_code == 0, r.output
    return {"root": root, "tasks": tasks, "work": str(root / "work"), "out": str(root / "out"),
            "policy": str(root / "policy.yaml")}


class SmallDisk:
    """A folder whose filesystem can be made (nearly) full, then freed."""

    def __init__(self, path, mode: str) -> None:
        self.path, self.mode, self.limit = str(path), mode, None
        os.makedirs(self.path)
        if mode == "tmpfs":
            try:
                r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", self.path],
                                   capture_output=True, text=True)
                why = r.stderr.strip() or f"exit status {r.returncode}"
            except FileNotFoundError:
                r, why = None, "no mount command"
            if r is None or r.returncode != 0:
                pytest.skip(f"cannot mount a tmpfs here ({why}); the fsize variant runs without privileges")

    def fill(self, room: int, file_limit: int = 4096) -> None:
        """Leave ``room`` bytes on the tmpfs (a ballast file), or limit the child's files to ``file_limit``."""
        if self.mode == "fsize":
            self.limit = file_limit
            return
        st = os.statvfs(self.path)
        with open(os.path.join(self.path, "ballast"), "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - room))
        st = os.statvfs(self.path)
        assert st.f_bavail * st.f_frsize == room

    def free(self) -> None:
        self.limit = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.path, "ballast"))

    def run(self, fn, *args):
        """``fn(*args)`` in a forked child under the disk's limit: ``(its return value, its error)``."""
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(1, initializer=_limit_file_size, initargs=(self.limit,)) as pool:
            return pool.apply(_catching, (fn, *args))

    def close(self) -> None:
        if self.mode == "tmpfs":
            subprocess.run(["umount", self.path], check=True)


def _limit_file_size(limit: int | None) -> None:
    if limit is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def _catching(fn, *args):
    try:
        return fn(*args), None
    except Exception as e:  # noqa: BLE001 - handed to the test to look at
        return None, (type(e).__name__, str(e), traceback.format_exc())


@pytest.fixture(params=["tmpfs", "fsize"])
def disk(request, tmp_path):
    d = SmallDisk(tmp_path / "disk", request.param)
    try:
        yield d
    finally:
        d.close()


def _visible(root: str) -> dict[str, str]:
    """Every file a reader would see under ``root`` (not dot files: temp files, the lock) -> md5."""
    return {os.path.relpath(os.path.join(d, f), root): hashlib.md5(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(root) for f in fs if not f.startswith(".") and f != "ballast"}


def _hidden(root: str) -> list[str]:
    return [f for _, _, fs in os.walk(root) for f in fs if f.startswith(".") and f != ".curate.lock"]


def _score(tasks, work):
    seen = []
    try:
        score_local(tasks, ScorerSpec("basic"), work, progress=lambda r, *_: seen.append(r))
    except OSError as e:  # the catalog, written last, can meet the full disk too
        return seen, str(e)
    return seen, None


def _table(work: str):
    import pyarrow.dataset as pads

    t = pads.dataset(os.path.join(work, "scores", "basic"), format="parquet").to_table()  # not _catalog.parquet
    assert t.num_rows == 48
    return t.sort_by([("shard", "ascending"), ("key", "ascending")])


def test_scoring_into_a_full_disk_resumes_to_the_clean_scores(clean, disk):
    work = os.path.join(disk.path, "work")
    disk.fill(3 * 8192 + 4096)  # three score files of ~7.5 kB fit, the fourth does not
    (results, catalog_error), err = disk.run(_score, clean["tasks"], work)
    assert err is None, err[2]
    failed = [r for r in results if r.failed]
    assert failed and len(results) == len(clean["tasks"])
    assert (len(failed) < len(results)) == (disk.mode == "tmpfs")  # tmpfs fills in the middle of the run
    for r in failed:  # the user is told which file could not be written, and why
        assert f"no space left writing {r.out}" in r.failed, r.failed
    assert catalog_error is None or "no space left writing" in catalog_error
    assert not _hidden(work)  # no temp file left behind
    for name in _visible(work):  # every visible score file is whole and is the clean run's
        if name.endswith(".parquet") and "_catalog" not in name:
            assert pq.read_table(os.path.join(work, name)).equals(pq.read_table(os.path.join(clean["work"], name)))

    disk.free()
    again = score_local(clean["tasks"], ScorerSpec("basic"), work)
    assert not again.failed and len(again.skipped) == len(results) - len(failed)
    assert _table(work).equals(_table(clean["work"]))


def _reshard_cli(policy: str, work: str, out: str):
    from typer.testing import CliRunner

    from curation.app.cli import app

    r = CliRunner().invoke(app, ["reshard", "--policy", policy, "--work", work, "--out", out, *RESHARD_ARGS])
    return r.exit_code, r.output


def test_resharding_into_a_full_disk_resumes_to_the_clean_shards(clean, disk):
    out = os.path.join(disk.path, "out")
    disk.fill(5 * 36864)  # groups take ~2 x 30 kB shards and three small records: two groups fit, not three
    (code, output), err = disk.run(_reshard_cli, clean["policy"], clean["work"], out)
    assert err is None, err[2]
    assert code == 2 and "Traceback" not in output, output
    assert "no space left writing " + out in output.replace("\n", ""), output
    assert not _hidden(out)  # no temp file left behind
    seen = _visible(out)
    reference = _visible(clean["out"])
    assert "manifest.json" not in seen and not any(n.endswith("index.wids.json") for n in seen)
    # the groups that completed before the disk filled are whole: the clean run's bytes
    shards = [n for n in seen if n.endswith(".tar")]
    assert all(seen[n] == reference[n] for n in shards)
    assert (len(shards) > 0) == (disk.mode == "tmpfs")

    disk.free()
    code, output = _reshard_cli(clean["policy"], clean["work"], out)
    assert code == 0, output
    done = _visible(out)
    for name in [n for n in reference if n.endswith((".tar", ".wids.json"))]:
        assert done[name] == reference[name], name


def _write_shard(out: str) -> list[str]:
    from curation.data.writer import ShardWriter

    with ShardWriter(out, max_samples=2) as w:
        for i in range(6):
            w.write({"__key__": f"s{i}", "jpg": os.urandom(6000), "txt": "a caption"})
    return [s.url for s in w.written]


def test_a_shard_writer_on_a_full_disk_names_its_shard_and_leaves_nothing_half_written(disk):
    out = os.path.join(disk.path, "shards")
    disk.fill(4 * 4096 + 4096, file_limit=8192)  # about one 2-sample shard (~12 kB) fits
    written, err = disk.run(_write_shard, out)
    assert written is None and err[0] == "NoSpaceError", err
    failed_at = os.path.join(out, "00001.tar" if disk.mode == "tmpfs" else "00000.tar")
    assert err[1].startswith(f"no space left writing {failed_at}"), err[1]
    assert ("size limit" in err[1]) == (disk.mode == "fsize")  # EFBIG says which limit
    assert not _hidden(out)
    assert sorted(_visible(out)) == (["00000.tar"] if disk.mode == "tmpfs" else [])
