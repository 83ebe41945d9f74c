"""Score, reshard and manifest on a small S3 corpus through a fault-injecting proxy, compared with a
fault-free run of the same work.

Starts moto's S3 server on loopback (or uses ``--endpoint``), writes a synthetic pair corpus of
``--shards`` shards into a bucket, then runs the pipeline (``basic`` scorer in this process, then
``curate``: selection, byte-exact resharding, index and manifest) twice or more, each into its own
prefix: once through ``curation.common.faultproxy.FaultProxy`` at rate 0 (the reference; its
requests are counted too) and ``--runs`` times at ``--rate`` (default 0.1: one request in ten gets
a 503 SlowDown, a 500 InternalError, a reset connection, a cut body or a delay). The retries are
the service's own defaults (``curation.data.storage``: botocore standard mode, 5 attempts; s3fs
retries around it).

A faulty run is identical when its score files equal the reference's (``pyarrow.Table.equals``),
its output shards have the same md5s in the same order, and its selection counts match. Samples
lost: reference keys missing from the faulty run's curated shards; duplicated: keys found there
more than once. Prints one JSON object::

    {"requests", "faults_injected", "runs_completed", "samples_lost", "samples_duplicated",
     "identical", "seconds", ...}

``requests`` and ``faults_injected`` are summed over the faulty runs (their split by kind is in
``faults_by_kind``); ``seconds`` is the faulty runs' wall time, ``clean_seconds`` the reference's;
``cpu_seconds`` is this process's user+system time (moto's server is a separate process, not
counted); ``load_avg`` is the 1-minute load average at the end.

    python benchmarks/faults.py [--rate 0.1] [--shards 64] [--per-shard 8] [--runs 1] [--seed 0] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

POLICY = {"defaults": [{"rule": "valid", "min_size": 24, "min_caption_words": 1}],
          "datasets": {"coyo_synth": [{"rule": "dedup", "column": "sha256"}]},
          "stages": {"align": {"coyo_synth": 1.0}}}
NOISE = {"exact_duplicate": 0.1, "corrupt_image": 0.05, "tiny_image": 0.05, "empty_caption": 0.05}


def start_moto() -> tuple[subprocess.Popen, str]:
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable)) or shutil.which("moto_server")
    if exe is None:
        raise SystemExit("moto_server not found: pip install -e '.[dev]', or pass --endpoint")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return proc, url
        except Exception:  # noqa: BLE001 - not up yet
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise SystemExit("moto_server did not start")
            time.sleep(0.2)


def pipeline(root: str, tag: str, per_shard: int) -> Any:
    """Score every shard, then curate (select, reshard, index, manifest) under ``root/tag``."""
    from curation.data.shards import dataset_of, list_shards
    from curation.scoring.engine import ScorerSpec, ShardTask, score_local
    from curation.selection.curate import curate
    from curation.selection.reshard import ReshardConfig

    tasks = [ShardTask(u, dataset_of(u)) for u in list_shards(f"{root}/corpus/coyo_synth")]
    report = score_local(tasks, ScorerSpec("basic"), f"{root}/{tag}/work")
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} shard(s) failed to score: {report.summary()['failed'][:3]}")
    manifest, _ = curate(f"{root}/{tag}/work", POLICY, f"{root}/{tag}/out", ReshardConfig(max_samples=max(2, per_shard)),
                         use_ray=False)
    return manifest


def score_tables(work: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from curation.data import storage

    base = f"{work}/scores/basic/dataset=coyo_synth"
    out = {}
    for url in storage.list_files(base, ".parquet"):
        with storage.open_url(url) as f:
            out[storage.basename(url)] = pq.read_table(f)
    return out


def curated_keys(manifest: Any) -> list[tuple[str, str]]:
    from curation.data import storage
    from curation.data.records import iter_raw_samples

    keys = []
    for ds, o in sorted(manifest.outputs.items()):
        for shard in o.shards:
            with storage.open_url(shard.url) as f:
                keys.extend((ds, s.key) for s in iter_raw_samples(f))
    return keys


def compare(root: str, clean: Any, clean_scores: dict, clean_keys: list, tag: str, faulty: Any) -> dict[str, Any]:
    scores = score_tables(f"{root}/{tag}/work")
    keys = curated_keys(faulty)
    same_scores = scores.keys() == clean_scores.keys() and all(scores[k].equals(clean_scores[k]) for k in scores)
    md5 = lambda m: {ds: [s.md5sum for s in o.shards] for ds, o in m.outputs.items()}  # noqa: E731
    counts = lambda m: {ds: s.model_dump() for ds, s in m.selection.items()}  # noqa: E731
    return {"identical": bool(same_scores and md5(faulty) == md5(clean) and counts(faulty) == counts(clean)),
            "lost": len(set(clean_keys) - set(keys)), "duplicated": len(keys) - len(set(keys))}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from curation.common.faultproxy import FaultProxy
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(k, v)
    proc, endpoint = (None, args.endpoint) if args.endpoint else start_moto()
    try:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        import s3fs

        bucket = f"faults-{uuid.uuid4().hex[:8]}"
        s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(bucket)
        root = f"s3://{bucket}"
        synthesize(f"{root}/corpus", SynthConfig(seed=args.seed, datasets=[
            DatasetSpec("coyo_synth", "pair", args.shards * args.per_shard, NOISE, args.per_shard)]))
        with FaultProxy(endpoint, rate=0.0) as p:
            os.environ["AWS_ENDPOINT_URL"] = p.url
            t0 = time.time()
            clean = pipeline(root, "clean", args.per_shard)
            clean_s, clean_requests = time.time() - t0, p.requests
        clean_scores, clean_keys = score_tables(f"{root}/clean/work"), curated_keys(clean)
        res = {"requests": 0, "faults_injected": 0, "runs_completed": 0, "samples_lost": 0, "samples_duplicated": 0,
               "identical": True, "seconds": 0.0, "errors": [], "faults_by_kind": {}}
        for i in range(args.runs):
            with FaultProxy(endpoint, rate=args.rate, seed=args.seed + i, delay_s=args.delay) as p:
                os.environ["AWS_ENDPOINT_URL"] = p.url
                t0 = time.time()
                try:
                    faulty = pipeline(root, f"faulty{i}", args.per_shard)
                except Exception as e:  # noqa: BLE001 - a failed run is a result here
                    res["errors"].append(f"{type(e).__name__}: {e}"[:500])
                    faulty = None
                res["seconds"] += time.time() - t0
                res["requests"] += p.requests
                res["faults_injected"] += len(p.injected)
                for k, n in p.counts().items():
                    res["faults_by_kind"][k] = res["faults_by_kind"].get(k, 0) + n
            os.environ["AWS_ENDPOINT_URL"] = endpoint
            if faulty is None:
                res["identical"] = False
                continue
            res["runs_completed"] += 1
            c = compare(root, clean, clean_scores, clean_keys, f"faulty{i}", faulty)
            res["identical"] = res["identical"] and c["identical"]
            res["samples_lost"] += c["lost"]
            res["samples_duplicated"] += c["duplicated"]
        usage = resource.getrusage(resource.RUSAGE_SELF)
        res.update(seconds=round(res["seconds"], 2), clean_seconds=round(clean_s, 2), clean_requests=clean_requests,
                   rate=args.rate, runs=args.runs, shards=args.shards, samples=args.shards * args.per_shard,
                   curated_samples=len(clean_keys), cpu_seconds=round(usage.ru_utime + usage.ru_stime, 2),
                   load_avg=round(os.getloadavg()[0], 2))
        return res
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=0.1, help="fraction of requests that get a fault (default 0.1)")
    ap.add_argument("--shards", type=int, default=64, help="shards in the corpus (default 64)")
    ap.add_argument("--per-shard", type=int, default=8, help="samples per shard (default 8)")
    ap.add_argument("--runs", type=int, default=1, help="faulty runs, seeds seed..seed+runs-1 (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.2, help="seconds a 'delay' fault holds its request")
    ap.add_argument("--endpoint", help="an S3 endpoint to use instead of starting moto_server")
    ap.add_argument("--smoke", action="store_true", help="2 shards of 4 samples at rate 0.2: a quick check")
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args(argv)
    if args.smoke:
        args.shards, args.per_shard, args.rate, args.delay = 2, 4, 0.2, 0.02
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    res = run(args)
    text = json.dumps(res)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    ok = res["identical"] and res["runs_completed"] == args.runs and not res["samples_lost"] and not res["samples_duplicated"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
