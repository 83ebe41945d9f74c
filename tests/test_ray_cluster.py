"""`curate score` on a real two-node Ray cluster (two `ray start` nodes on this machine, each
with its own temp dir and one CPU), with S3 (moto's server on loopback) as the shared store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    r = subprocess.run([str(BIN / "ray"), "start", *args, "--num-cpus", "1", "--disable-usage-stats",
                        "--dashboard-agent-listen-port", str(_free_port())],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


def _kill_processes_under(marker: str) -> None:
    """Stop only what this test started (``ray stop`` would stop every Ray on the machine): the
    processes whose command line names ``marker`` and their children (Ray's agents and workers
    rename themselves ``ray::...``, and would outlive their raylet)."""
    parents: dict[int, int] = {}
    ours: set[int] = set()
    for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
            with open(f"/proc/{pid}/stat") as f:
                parents[pid] = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and marker.encode() in cmdline:
            ours.add(pid)
    while True:
        children = {p for p, pp in parents.items() if pp in ours and p != os.getpid()} - ours
        if not children:
            break
        ours |= children
    for pid in ours:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _score(recipe: Path, env: dict[str, str]) -> list[dict]:
    r = subprocess.run([str(BIN / "curate"), "score", "--config", str(recipe), "--json"], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(r.stdout)


def _table(work: str):
    import pyarrow.dataset as pads

    from curation.data import storage

    fs, path = storage.get_fs(work)
    t = pads.dataset(f"{path}/scores/basic", filesystem=fs, format="parquet", partitioning="hive").to_table()
    return t.sort_by([("dataset", "ascending"), ("shard", "ascending"), ("key", "ascending")])


@pytest.mark.slow
@pytest.mark.s3
def test_score_on_a_two_node_cluster_matches_a_local_run(s3_bucket, tmp_path):
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize

    synthesize(f"{s3_bucket}/corpus", SynthConfig(seed=5, datasets=[
        DatasetSpec("coyo_synth", "pair", 48, {"corrupt_image": 0.1, "empty_caption": 0.1}, 12)]))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    recipes = {}
    for name, ray_cfg in (("local", {"num_cpus": 2}), ("cluster", {})):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump({
            "work": f"{s3_bucket}/work-{name}", "ray": ray_cfg,
            "sources": [{"shards": f"{s3_bucket}/corpus/coyo_synth", "kind": "pair"}],
            "scorers": [{"name": "basic", "workers": 2, "num_cpus": 1}]}))
    local = _score(recipes["local"], env)[0]
    assert local["scored"] == 4

    marker = tempfile.mkdtemp(prefix="raytwo", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = _free_port()
    try:
        _ray_start(["--head", "--port", str(port), "--temp-dir", f"{marker}/head", "--include-dashboard=false"], env)
        _ray_start(["--address", f"127.0.0.1:{port}", "--temp-dir", f"{marker}/node2"], env)
        cluster = _score(recipes["cluster"], {**env, "RAY_ADDRESS": f"127.0.0.1:{port}"})[0]
    finally:
        _kill_processes_under(marker)
        shutil.rmtree(marker, ignore_errors=True)
    assert cluster["scored"] == 4 and not cluster["failed"]
    assert len(cluster["shards_per_node"]) == 2, cluster  # work ran on both nodes
    a, b = _table(f"{s3_bucket}/work-local"), _table(f"{s3_bucket}/work-cluster")
    assert a.num_rows == b.num_rows == 48
    assert a.equals(b), "the cluster's score table differs from the local run's"
