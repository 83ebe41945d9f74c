"""The nightly curate deployment against an S3 store that keeps failing, then healthy again.

The flow runs are created from a deployment on a Prefect test server (``run_deployment``) and
executed by Prefect's flow engine in this process (``run_flow``, what a worker's subprocess runs),
so their states and logs are the server's (the session's test server, conftest ``prefect_server``);
the store is moto's server behind the fault proxy."""

from __future__ import annotations

import re

import pytest
import yaml

from curation.common.faultproxy import FaultProxy
from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
from curation.data import storage

pytestmark = pytest.mark.s3


@pytest.fixture(scope="module")
def harness(prefect_server):
    yield
    import ray

    ray.shutdown()  # its workers were started pointing at this module's proxy


def _run(deployment: str, params: dict):
    from prefect.deployments import run_deployment
    from prefect.flow_engine import load_flow_run, run_flow

    from flows.curation_flows import curate_flow

    fr = run_deployment(deployment, parameters=params, timeout=0)
    state = run_flow(curate_flow, flow_run=load_flow_run(fr.id), return_type="state")
    return fr.id, state


def _logs(flow_run_id) -> str:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # run logs are shipped to the server in batches

    async def read():
        async with get_client() as c:
            return await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    return "\n".join(x.message for x in asyncio.run(read()))


@pytest.mark.slow
def test_failing_store_fails_the_run_and_the_next_night_recovers(harness, s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    from curation.scoring.engine import ScorerSpec, ShardTask, score_local
    from curation.selection.curate import curate
    from curation.selection.manifest import load_manifest
    from curation.data.shards import dataset_of, list_shards
    from flows.curation_flows import curate_flow

    corpus, work, out = f"{s3_bucket}/corpus", f"{s3_bucket}/work", f"{s3_bucket}/curated"
    synthesize(corpus, SynthConfig(seed=5, datasets=[DatasetSpec("coyo_synth", "pair", 12, {}, 6)]))
    later = f"{s3_bucket}/later/coyo_synth"  # a shard that arrives after the first night
    synthesize(f"{s3_bucket}/later", SynthConfig(seed=6, datasets=[DatasetSpec("coyo_synth", "pair", 6, {}, 6)]))
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"defaults": [{"rule": "valid"}], "stages": {"align": {"coyo_synth": 1.0}}}))
    recipe = tmp_path / "score.yaml"
    recipe.write_text(yaml.safe_dump({"work": work, "ray": {"num_cpus": 1},
                                      "sources": [{"shards": f"{corpus}/coyo_synth", "kind": "pair"}],
                                      "scorers": [{"name": "basic"}]}))
    # night 1, what the deployment ran before: scores and a published manifest
    tasks = [ShardTask(u, dataset_of(u)) for u in list_shards(f"{corpus}/coyo_synth")]
    assert not score_local(tasks, ScorerSpec("basic"), work).failed
    first, _ = curate(work, str(policy), out, use_ray=False)
    import s3fs

    s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint}, skip_instance_cache=True).copy(
        f"{later[5:]}/00000.tar", f"{corpus[5:]}/coyo_synth/00002.tar")

    dep = curate_flow.to_deployment(name="nightly-faults", parameters={
        "score_recipe": str(recipe), "policy": str(policy), "out": out, "max_samples": 8})
    dep.apply()
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("CURATION_S3FS_RETRIES", "1")
    with FaultProxy(s3_endpoint, rate=1.0, kinds=("slowdown", "internal")) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        # night 2: the store fails every request
        run_id, state = _run("curate/nightly-faults", {})
        assert state.is_failed(), state
        logs = _logs(run_id)
        assert re.search(rf"{corpus}/coyo_synth: An error occurred \((SlowDown|InternalError|500|503)\)", logs), logs[-2000:]
        assert len(p.injected) > 0
        p.rate = 0.0  # night 3: healthy again
        run_id, state = _run("curate/nightly-faults", {})
        assert state.is_completed(), _logs(run_id)[-3000:]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    m = load_manifest(f"{out}/manifest.json")
    assert m.id != first.id and m.parent == first.id  # the failed night published nothing to link to
    assert m.outputs["coyo_synth"].samples == m.selection["coyo_synth"].kept
    assert storage.exists(f"{out}/manifests/{first.id}.json")
