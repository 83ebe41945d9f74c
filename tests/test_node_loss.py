"""A Ray node lost in the middle of scoring and in the middle of resharding: the job completes on the
node that is left, with the score table and the shards of a run that lost nothing.

One two-node cluster for the module (two ``ray start`` on this machine, each with its own temp
dir and one CPU; the local filesystem is the store both nodes share). The worker node's Python
processes load a ``sitecustomize`` that holds every ``storage.write_bytes`` call (a score file;
a resharded group's first stats file, written after the group's shards were made visible) and
announces it with a file: the test kills every process under that node's temp dir once a worker
there is held, so the node is lost with its work in flight, every time, without sleeps. The head
is told to declare a silent node dead within about a second (``RAY_health_check_*``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from test_ray_cluster import _free_port, _kill_processes_under, _ray_start

BIN = Path(sys.executable).parent
HOLD = '''
import os, time
from curation.data import storage
_hold, _mode, _write = os.environ["NODE_LOSS_HOLD_DIR"], os.environ["NODE_LOSS_MODE"], storage.write_bytes
def write_bytes(url, data, storage_options=None):
    open(os.path.join(_hold, "%s-%d" % (_mode, os.getpid())), "w").close()
    while _mode == "held" or not os.path.exists(os.path.join(_hold, "release")):
        time.sleep(0.05)  # held: until this node is killed; gated: until the test releases it
    return _write(url, data, storage_options)
storage.write_bytes = write_bytes
'''
FAST_NODE_DEATH = {"RAY_health_check_initial_delay_ms": "0", "RAY_health_check_period_ms": "200",
                   "RAY_health_check_timeout_ms": "200", "RAY_health_check_failure_threshold": "3"}


class Cluster:
    def __init__(self, root: str, env: dict[str, str]) -> None:
        self.root, self.env, self.port = root, env, _free_port()
        self.hold = os.path.join(root, "hold")
        self.nodes = 0
        os.makedirs(self.hold)
        Path(self.hold, "sitecustomize.py").write_text(HOLD)
        _ray_start(["--head", "--port", str(self.port), "--temp-dir", f"{root}/head", "--include-dashboard=false"],
                   {**self._hooked("gated"), **FAST_NODE_DEATH})

    def _hooked(self, mode: str) -> dict[str, str]:
        """The environment of a node whose Python processes load HOLD in ``mode``."""
        pythonpath = os.pathsep.join(filter(None, [self.hold, self.env.get("PYTHONPATH")]))
        return {**self.env, "PYTHONPATH": pythonpath, "NODE_LOSS_HOLD_DIR": self.hold, "NODE_LOSS_MODE": mode}

    def add_worker_node(self) -> str:
        """Start a worker node whose Python processes hold their first write; its temp dir."""
        self.nodes += 1
        temp = f"{self.root}/n{self.nodes}"
        _ray_start(["--address", f"127.0.0.1:{self.port}", "--temp-dir", temp], self._hooked("held"))
        return temp

    def _wait_for(self, proc, what: str, done) -> None:
        deadline = time.monotonic() + 120
        while not done():
            assert proc.poll() is None and time.monotonic() < deadline, f"{what} never happened"
            time.sleep(0.02)

    def run_losing(self, node: str, argv: list[str], gate_head: bool) -> subprocess.CompletedProcess:
        """``curate <argv>`` on the cluster; kill ``node`` once one of its workers is held mid-write.
        With ``gate_head`` the head's workers wait at their first write until the driver has seen
        the loss (its retry warning), so work is still queued when the lost node's shard comes back."""
        for f in os.listdir(self.hold):
            if f.startswith(("held-", "gated-", "release")):
                os.unlink(os.path.join(self.hold, f))
        if not gate_head:
            Path(self.hold, "release").touch()
        err_path = Path(self.hold, "driver.err")
        with open(err_path, "w") as err_file:
            proc = subprocess.Popen([str(BIN / "curate"), *argv], stdout=subprocess.PIPE, stderr=err_file, text=True,
                                    env={**self.env, "RAY_ADDRESS": f"127.0.0.1:{self.port}"})
        try:
            self._wait_for(proc, "a write on the worker node", lambda: any(
                f.startswith("held-") for f in os.listdir(self.hold)))
            _kill_processes_under(node)
            if gate_head:
                self._wait_for(proc, "the driver's retry after the loss", lambda: "retrying" in err_path.read_text())
                Path(self.hold, "release").touch()
            out, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()  # a run that hangs on the lost node must not outlive the test
        return subprocess.CompletedProcess(argv, proc.returncode, out, err_path.read_text())


@pytest.fixture(scope="module")
def cluster():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    root = tempfile.mkdtemp(prefix="raylost", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        yield Cluster(root, env)
    finally:
        _kill_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """48 pairs in 8 shards, and their scores from a run in this process, without Ray (the reference)."""
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
    from curation.data.shards import dataset_of, list_shards
    from curation.scoring.engine import ScorerSpec, ShardTask, score_local

    root = tmp_path_factory.mktemp("nodeloss")
    synthesize(str(root / "corpus"), SynthConfig(seed=11, datasets=[DatasetSpec("pairs", "pair", 48, {}, 6)]))
    tasks = [ShardTask(u, dataset_of(u)) for u in list_shards(str(root / "corpus" / "pairs"))]
    assert len(tasks) == 8 and not score_local(tasks, ScorerSpec("basic"), str(root / "clean")).failed
    return root


def _table(work: str):
    import pyarrow.dataset as pads

    t = pads.dataset(os.path.join(work, "scores", "basic"), format="parquet").to_table()
    return t.sort_by([("shard", "ascending"), ("key", "ascending")])


@pytest.mark.slow
def test_scoring_completes_when_a_node_is_lost(cluster, corpus):
    recipe = corpus / "score.yaml"
    recipe.write_text(yaml.safe_dump({"work": str(corpus / "work"),
                                      "sources": [{"shards": str(corpus / "corpus" / "pairs"), "kind": "pair"}],
                                      "scorers": [{"name": "basic", "workers": 2, "num_cpus": 1}]}))
    node = cluster.add_worker_node()
    r = cluster.run_losing(node, ["score", "--config", str(recipe), "--json"], gate_head=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (report,) = json.loads(r.stdout)
    assert report["scored"] == 8 and not report["failed"], report
    assert len(report["shards_per_node"]) == 1  # the lost node finished nothing
    assert _table(str(corpus / "work")).equals(_table(str(corpus / "clean")))


def _md5s(out: Path) -> dict[str, str]:
    return {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in out.rglob("*") if p.suffix == ".tar"
            or p.name == "index.wids.json"}


@pytest.mark.slow
def test_resharding_completes_when_a_node_is_lost(cluster, corpus):
    work = corpus / "clean"
    from curation.selection.curate import curate
    from curation.selection.reshard import ReshardConfig

    policy = {"defaults": [{"rule": "valid"}]}
    curate(str(work), policy, str(corpus / "out-clean"), ReshardConfig(max_samples=3), use_ray=False)  # in this process
    (corpus / "policy.yaml").write_text(yaml.safe_dump(policy))
    args = ["reshard", "--policy", str(corpus / "policy.yaml"), "--work", str(work), "--max-samples", "3"]
    node = cluster.add_worker_node()
    r = cluster.run_losing(node, [*args, "--out", str(corpus / "out"), "--workers", "2"], gate_head=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    expected = _md5s(corpus / "out-clean")
    assert len(expected) == 8 * 6 // 3 + 1
    assert _md5s(corpus / "out") == expected
