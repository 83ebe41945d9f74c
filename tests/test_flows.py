"""Prefect flows under prefect_test_harness, and a real server + process worker running a deployment."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
from scoring_fixture import tiny_models  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def harness(prefect_server):
    """The session's Prefect test server (conftest), shared with tests/test_flow_faults.py."""
    yield


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("flows")
    synthesize(str(root / "corpus"), SynthConfig(seed=9, datasets=[
        DatasetSpec("coyo_synth", "pair", 40, {"exact_duplicate": 0.1, "empty_caption": 0.05}, 20),
        DatasetSpec("mmc4_synth", "interleaved", 8, {}, 8)]))
    (root / "score.yaml").write_text(yaml.safe_dump({
        "work": str(root / "work"), "ray": {"num_cpus": 2},
        "sources": [{"shards": str(root / "corpus" / "coyo_synth"), "kind": "pair"},
                    {"shards": str(root / "corpus" / "mmc4_synth"), "kind": "interleaved"}],
        "scorers": [{"name": "basic"}]}))
    (root / "policy.yaml").write_text(yaml.safe_dump({
        "defaults": [{"rule": "valid", "min_caption_words": 1}],
        "datasets": {"coyo_synth": [{"rule": "dedup"}]},
        "stages": {"align": {"coyo_synth": 1.0}, "pretrain": {"mmc4_synth": 1.0}}}))
    return root


def _artifacts(flow_run_id) -> dict[str, str]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as c:
            return await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a.data for a in asyncio.run(read()) if a.key}


def test_curate_flow_publishes_table_and_report(harness, corpus):
    from flows.curation_flows import curate_flow

    state = curate_flow(str(corpus / "score.yaml"), str(corpus / "policy.yaml"), str(corpus / "curated"), 16,
                        return_state=True)
    assert state.is_completed(), state
    curated = state.result()
    assert os.path.isfile(curated["manifest"]) and curated["selection"]["coyo_synth"]["dropped"]["dedup:sha256"] == 4
    arts = _artifacts(state.state_details.flow_run_id)
    assert {"kept-and-dropped", "curation-report"} <= set(arts)
    table = json.loads(arts["kept-and-dropped"]) if isinstance(arts["kept-and-dropped"], str) else arts["kept-and-dropped"]
    assert {"dataset": "coyo_synth", "kind": "pair", "reason": "dedup:sha256", "samples": 4} in table
    assert curated["id"] in arts["curation-report"] and "data:image/png;base64," in arts["curation-report"]


def test_rerun_with_same_inputs_hits_the_cache(harness, corpus):
    from prefect import flow

    from flows.tasks import curate_task, score_task, scoring_plan

    @flow
    def twice(recipe: str, policy: str, out: str):
        plan = scoring_plan(recipe)
        a = score_task(plan, "basic", return_state=True)
        b = score_task(plan, "basic", return_state=True)
        c = curate_task(str(corpus / "work"), policy, out, return_state=True)
        d = curate_task(str(corpus / "work"), policy, out, return_state=True)
        return [s.name for s in (a, b, c, d)]

    names = twice(str(corpus / "score.yaml"), str(corpus / "policy.yaml"), str(corpus / "curated2"))
    assert names[1] == "Cached" and names[3] == "Cached", names


def test_bad_parameters_fail_at_once(harness, corpus, monkeypatch):
    from prefect.exceptions import ParameterTypeError

    from flows.curation_flows import curate_flow, score_flow
    from flows.training_flows import train_flow

    with pytest.raises(ParameterTypeError):
        curate_flow(str(corpus / "score.yaml"), str(corpus / "policy.yaml"), str(corpus / "x"), max_samples="many")
    with pytest.raises(FileNotFoundError, match="scoring recipe not found: /nonexistent/score.yaml"):
        score_flow("/nonexistent/score.yaml")
    with pytest.raises(FileNotFoundError, match="training recipe not found"):
        train_flow(str(corpus / "curated" / "manifest.json"), str(corpus / "missing-train.yaml"))
    # an unreachable Ray cluster fails the run at once, naming the address, and writes nothing
    import ray

    ray.shutdown()  # earlier flows started a local Ray in this process
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")
    bad = corpus / "score-bad.yaml"
    bad.write_text((corpus / "score.yaml").read_text().replace(str(corpus / "work"), str(corpus / "work-bad")))
    t0 = time.time()
    with pytest.raises(ConnectionError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        score_flow(str(bad))
    assert time.time() - t0 < 60 and not (corpus / "work-bad").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RUN = """
import asyncio, json, sys
from prefect.deployments import run_deployment
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
fr = run_deployment("curate/nightly-curation", parameters=json.loads(sys.argv[1]), timeout=600)
async def arts():
    async with get_client() as c:
        return await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[fr.id])))
print(json.dumps({"state": fr.state.type.value, "artifacts": sorted(a.key or "" for a in asyncio.run(arts()))}))
"""


@pytest.mark.slow
def test_deployment_served_by_a_process_worker(corpus, tmp_path):
    """A real `prefect server` on loopback, the work pool, `prefect deploy --all` from prefect.yaml,
    a process worker, and a triggered run of the nightly curation deployment."""
    bindir = Path(sys.executable).parent
    prefect = str(bindir / "prefect")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
               PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_AUTH_MODE="disabled", PATH=f"{bindir}:{env.get('PATH', '')}")
    procs = []
    try:
        procs.append(subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                                      stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT))
        import urllib.request

        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
                break
            except Exception:  # noqa: BLE001
                assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                time.sleep(0.5)
        run = lambda *a: subprocess.run([prefect, *a], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)  # noqa: E731
        r = run("work-pool", "create", "curation-pool", "--type", "process")
        assert r.returncode == 0, r.stdout + r.stderr
        r = run("--no-prompt", "deploy", "--all")
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        r = run("deployment", "ls")
        assert "curate/nightly-curation" in r.stdout and "train/train-from-manifest" in r.stdout
        r = run("deployment", "inspect", "curate/nightly-curation")
        assert "0 2 * * *" in r.stdout  # the nightly cron schedule
        procs.append(subprocess.Popen([prefect, "worker", "start", "--pool", "curation-pool", "--type", "process"], env=env,
                                      cwd=REPO, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT))
        params = {"score_recipe": str(corpus / "score.yaml"), "policy": str(corpus / "policy.yaml"),
                  "out": str(tmp_path / "curated")}
        r = subprocess.run([sys.executable, "-c", RUN, json.dumps(params)], env=env, cwd=REPO, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:] + (tmp_path / "worker.log").read_text()[-3000:]
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["state"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
        assert {"kept-and-dropped", "curation-report"} <= set(result["artifacts"])
        assert (tmp_path / "curated" / "manifest.json").is_file()
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()


def _score_file_mtimes(work: Path) -> dict[str, int]:
    """Score files only (each scorer's _catalog.parquet indexes them and changes with them)."""
    return {str(p.relative_to(work)): p.stat().st_mtime_ns
            for p in sorted((work / "scores").glob("*/dataset=*/*.parquet"))}


def test_nightly_run_sees_a_new_shard_and_rescores_only_it(harness, tmp_path):
    """The nightly deployment passes the same paths every night: a shard added between two
    nights must be scored (only it) and land in the second manifest, whose parent is the first."""
    from curation.selection.manifest import lineage, load_manifest
    from flows.curation_flows import curate_flow

    corpus = tmp_path / "corpus"
    synthesize(str(corpus), SynthConfig(seed=3, datasets=[DatasetSpec("coyo_synth", "pair", 36, {}, 12)]))
    later = tmp_path / "later"  # the third shard arrives on the second night
    later.mkdir()
    for f in (corpus / "coyo_synth").glob("00002*"):
        f.rename(later / f.name)
    work, out = tmp_path / "work", tmp_path / "curated"
    (tmp_path / "score.yaml").write_text(yaml.safe_dump({
        "work": str(work), "ray": {"num_cpus": 2},
        "sources": [{"shards": str(corpus / "coyo_synth"), "kind": "pair"}], "scorers": [{"name": "basic"}]}))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump({"defaults": [{"rule": "valid"}],
                                                         "stages": {"align": {"coyo_synth": 1.0}}}))
    args = (str(tmp_path / "score.yaml"), str(tmp_path / "policy.yaml"), str(out))

    first = curate_flow(*args)
    night1 = _score_file_mtimes(work)
    assert len(night1) == 2 and first["selection"]["coyo_synth"]["scored"] == 24

    # an unchanged night is a cache hit: nothing is re-scored and the manifest stays
    again = curate_flow(*args, return_state=True)
    assert again.is_completed() and _score_file_mtimes(work) == night1
    assert again.result()["id"] == first["id"]

    for f in later.iterdir():
        f.rename(corpus / "coyo_synth" / f.name)
    second = curate_flow(*args)
    night2 = _score_file_mtimes(work)
    assert {k: night2[k] for k in night1} == night1, "an old shard was re-scored"
    assert set(night2) - set(night1) == {"scores/basic/dataset=coyo_synth/00002.parquet"}
    assert second["selection"]["coyo_synth"]["scored"] == 36 and second["id"] != first["id"]
    m = load_manifest(str(out / "manifest.json"))
    assert m.parent == first["id"] and m.outputs["coyo_synth"].samples == 36
    assert [x.id for x in lineage(str(out / "manifest.json"))] == [second["id"], first["id"]]
    from typer.testing import CliRunner

    from curation.app.cli import app

    r = CliRunner().invoke(app, ["manifest", "show", str(out / "manifest.json"), "--lineage", "--json"])
    assert r.exit_code == 0, r.output
    assert [(x["id"], x["kept"]["coyo_synth"]) for x in json.loads(r.stdout)] == [(second["id"], 36), (first["id"], 24)]


def test_cache_keys_follow_content_not_names(harness, tmp_path):
    """Same paths, changed bytes: a rewritten shard or an edited policy is never a cache hit."""
    from prefect import flow

    from flows.tasks import curate_task, score_task, scoring_plan

    corpus = tmp_path / "corpus"
    synthesize(str(corpus), SynthConfig(seed=4, datasets=[DatasetSpec("coyo_synth", "pair", 16, {}, 8)]))
    recipe, policy = tmp_path / "score.yaml", tmp_path / "policy.yaml"
    recipe.write_text(yaml.safe_dump({"work": str(tmp_path / "work"), "ray": {"num_cpus": 2},
                                      "sources": [{"shards": str(corpus / "coyo_synth")}], "scorers": [{"name": "basic"}]}))
    policy.write_text(yaml.safe_dump({"defaults": [{"rule": "valid"}]}))

    @flow
    def once():
        s = score_task(scoring_plan(str(recipe)), "basic", return_state=True)
        c = curate_task(str(tmp_path / "work"), str(policy), str(tmp_path / "out"), return_state=True)
        return s.name, c.name

    assert once() == ("Completed", "Completed")
    assert once() == ("Cached", "Cached")
    shard = corpus / "coyo_synth" / "00001.tar"
    shard.write_bytes(shard.read_bytes())  # same name, new version (mtime)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    assert once()[0] == "Completed"
    policy.write_text(yaml.safe_dump({"defaults": [{"rule": "valid", "min_caption_words": 2}]}))
    assert once()[1] == "Completed"


def _task_runs_and_progress(flow_run_id) -> tuple[list[str], list]:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as c:
            runs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            arts = await c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
            return [r.name for r in runs], [a.data for a in arts if a.type == "progress"]

    return asyncio.run(read())


def test_score_flow_runs_each_fused_pass_as_one_task(harness, tmp_path, tiny_models):
    """basic + clip + deltaloss through the Prefect flow score as ``curate score`` does: one task for
    their pass, named by its scorers, each shard read once for all three (each read decodes each
    image once: test_scoring_pass.py), every scorer's files written, its progress artifact at 100 %."""
    from flows.curation_flows import score_flow

    synthesize(str(tmp_path / "corpus"), SynthConfig(seed=3, datasets=[DatasetSpec("pairs", "pair", 12, {}, 6)]))
    recipe = tmp_path / "score.yaml"
    recipe.write_text(yaml.safe_dump({"work": str(tmp_path / "work"), "ray": {"num_cpus": 2},
                                      "sources": [{"shards": str(tmp_path / "corpus" / "pairs"), "kind": "pair"}],
                                      "scorers": [{"name": "basic", "batch_size": 6},
                                                  {"name": "clip", "params": {"model": tiny_models["clip"]}, "batch_size": 6},
                                                  {"name": "deltaloss", "batch_size": 6, "params": {
                                                      "small": tiny_models["small"], "large": tiny_models["large"]}}]}))
    state = score_flow(str(recipe), return_state=True)
    assert state.is_completed(), state
    summaries = state.result()
    assert [(s["scorer"], s["scored"], s["rows"]) for s in summaries] == [(n, 2, 12) for n in ("basic", "clip", "deltaloss")]
    assert summaries[0]["pass"] == {"scorers": ["basic", "clip", "deltaloss"], "shard_reads": 2, "reads_per_shard": 1.0}
    names, progress = _task_runs_and_progress(state.state_details.flow_run_id)
    assert names == ["score-basic+clip+deltaloss"] and progress == [100.0]

