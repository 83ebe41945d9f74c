"""Selection, near-dedup and reshard planning on pools of growing size: time, CPU, peak RSS.

For each size it writes a synthetic score store shaped like a COYO pool (``benchmarks/scale_store.py``:
basic, clip and deltaloss score files, 10k rows a shard, 2 % exact and 2 % near duplicates
planted), then, each in a fresh process (so peak RSS is the work's own):

- ``select``: ``run_selection`` with the demo's rules plus ``near_dedup`` and ``top_k``: valid,
  dedup, near_dedup (max_distance 4), a clip threshold, top_k delta_loss 0.5 (decisions to
  Parquet, memory bounded by ``--memory-limit``);
- ``candidates``: the candidate pairs near_dedup's tables produce per row (its work);
- ``recall`` (at ``--recall-at`` rows): near_dedup's drops against the exact pigeonhole bands
  (``blocks: d + 1``, quadratic), as recall of their drops and drops they did not make;
- ``plan``: the reshard plan streamed from the decisions (kept keys per output group).

``--plan-kept N ...`` also dry-runs the reshard planner on decision tables alone with exactly N
kept samples each (``scale_store.write_decisions``: no score store, so kept counts past what a
selection on this machine reaches), in a fresh process per N. Peak RSS is each process's own
(``VmHWM``).

    python benchmarks/bench_scale.py --sizes 100000 300000 1000000 [--recall-at 1000000] [--json out.json]
    python benchmarks/bench_scale.py --root DIR --keep --sizes --plan-kept 1000000 4000000 16000000

JSON: ``{"sizes": {N: {"select_s", "select_cpu_s", "peak_rss_mb", "near_dedup_candidates_per_row",
"near_dedup_recall", "plan_s", "plan_peak_rss_mb", ...}}, "exponent_select", "projection_1e9_rows_s",
"plan_dry_run": {"kept": {N: {"plan_s", "plan_cpu_s", "plan_peak_rss_mb", "import_rss_mb"}}, "rss_ratio"}}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def policy(blocks: int | None = None) -> dict:
    nd = {"rule": "near_dedup", "column": "phash", "max_distance": 4}
    if blocks:
        nd["blocks"] = blocks
    return {"defaults": [{"rule": "valid", "min_size": 24, "max_aspect_ratio": 4, "min_caption_words": 2}],
            "datasets": {"coyo": [{"rule": "dedup"}, nd, {"rule": "threshold", "column": "clip_score", "min": 0.2},
                                  {"rule": "top_k", "column": "delta_loss", "fraction": 0.5}]}}


def peak_rss_mb() -> float:
    """This process's own peak RSS: ``VmHWM`` of its address space. (``ru_maxrss`` is not: a child
    started by ``subprocess`` inherits the parent's peak through fork and exec, so a small child
    reports the bench parent's RSS.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # not Linux: an upper bound


def _usage() -> dict:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mb": peak_rss_mb(), "cpu_s": round(r.ru_utime + r.ru_stime, 2)}


def child_select(work: str, out: str, memory_limit: str | None, blocks: int | None) -> dict:
    from curation.scoring.store import ScoreStore
    from curation.selection.policy import load_policy, run_selection
    from curation.selection.runner import Resources

    t0 = time.time()
    r = run_selection(ScoreStore(work), load_policy(policy(blocks)), out, resources=Resources(memory_limit=memory_limit))
    return {"select_s": round(time.time() - t0, 2), "kept": r.kept_total(), "counts": r.counts["coyo"]["dropped"],
            **_usage()}


def child_candidates(work: str) -> dict:
    import duckdb

    from curation.selection.near_dedup import candidate_pairs_sql, plan_blocks

    con = duckdb.connect()
    con.execute("SET enable_progress_bar = false")
    glob = os.path.join(work, "scores", "basic", "dataset=*", "*.parquet")
    con.execute(f"CREATE TABLE alive AS SELECT dataset, ('0x' || phash)::UBIGINT AS _h, row_number() OVER () AS _rank "
                f"FROM read_parquet('{glob}')")
    n = con.execute("SELECT count(*) FROM alive").fetchall()[0][0]
    t0 = time.time()
    pairs = con.execute(candidate_pairs_sql("alive", n, 4)).fetchall()[0][0]
    return {"candidates_per_row": round(pairs / n, 3), "blocks": plan_blocks(n, 4), "candidates_s": round(time.time() - t0, 2)}


def child_recall(ours: str, exact: str) -> dict:
    import duckdb

    q = ("SELECT count(*) FILTER (WHERE a.d AND b.d), count(*) FILTER (WHERE b.d), count(*) FILTER (WHERE a.d AND NOT b.d) "
         "FROM (SELECT shard, key, dropped_by = 'near_dedup:phash' AS d FROM read_parquet('{}')) a JOIN "
         "(SELECT shard, key, dropped_by = 'near_dedup:phash' AS d FROM read_parquet('{}')) b USING (shard, key)")
    both, theirs, extra = duckdb.sql(q.format(ours, exact)).fetchall()[0]
    return {"recall": round(both / theirs, 5) if theirs else 1.0, "exact_drops": theirs, "extra_drops": extra}


def child_plan(decisions: str) -> dict:
    from curation.selection.curate import plan_from_decisions

    before = _usage()  # the interpreter with the planner's modules (duckdb, pyarrow) imported
    t0 = time.time()
    groups = plan_from_decisions(decisions, max_samples=10_000)
    return {"plan_s": round(time.time() - t0, 2), **groups, **_usage(), "import_rss_mb": before["peak_rss_mb"]}


def plan_curve(root: str, kept_sizes: list[int]) -> dict:
    """The reshard planner's dry run on decision tables alone (``scale_store.write_decisions``), each
    with exactly N kept samples: its time, CPU and peak RSS per N, and the RSS ratio largest/smallest."""
    from benchmarks.scale_store import write_decisions

    out: dict = {}
    for k in sorted(kept_sizes):
        path = os.path.join(root, f"decisions_kept{k}.parquet")
        if not os.path.exists(path):
            write_decisions(path + ".tmp", k)
            os.replace(path + ".tmp", path)
        p = run_child("plan", path)
        assert p["kept"] == k, (p["kept"], k)
        out[k] = {"plan_s": p["plan_s"], "plan_cpu_s": p["cpu_s"], "plan_peak_rss_mb": p["peak_rss_mb"],
                  "import_rss_mb": p["import_rss_mb"], "plan_groups": p["groups"]}
        print(f"[kept {k}] reshard plan {p['plan_s']} s, cpu {p['cpu_s']} s, peak RSS {p['peak_rss_mb']} MB "
              f"({p['import_rss_mb']} MB after imports)", flush=True)
    rss = [r["plan_peak_rss_mb"] for r in out.values()]
    return {"kept": out, "rss_ratio": round(max(rss) / min(rss), 3),
            "exponent_cpu": exponent([(k, r["plan_cpu_s"]) for k, r in out.items()])}


def run_child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], capture_output=True, text=True,
                       env=env, cwd=ROOT)
    if r.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def exponent(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) over log(n)."""
    if len(points) < 2:
        return None
    xs = [math.log(n) for n, _ in points]
    ys = [math.log(max(t, 1e-3)) for _, t in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return round(sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs), 3)


def one_size(root: str, n: int, args: argparse.Namespace) -> dict:
    from benchmarks.scale_store import write_store

    work = os.path.join(root, f"n{n}")
    t0 = time.time()
    if not os.path.isdir(os.path.join(work, "scores")):
        write_store(work, n, args.per_shard)
    row: dict = {"store_s": round(time.time() - t0, 1)}
    decisions = os.path.join(work, "decisions.parquet")
    sel = run_child("select", work, decisions, args.memory_limit or "")
    row.update(sel)
    print(f"[{n}] select {sel['select_s']} s, cpu {sel['cpu_s']} s, peak RSS {sel['peak_rss_mb']} MB", flush=True)
    if not args.skip_candidates:
        c = run_child("candidates", work)
        row["near_dedup_candidates_per_row"] = c["candidates_per_row"]
        row["near_dedup_blocks"] = c["blocks"]
        print(f"[{n}] near_dedup: {c['candidates_per_row']} candidates/row ({c['blocks']} blocks)", flush=True)
    if n == args.recall_at:
        exact = os.path.join(work, "decisions_exact.parquet")
        ex = run_child("select", work, exact, args.memory_limit or "", "5")
        rec = run_child("recall", decisions, exact)
        row.update({"near_dedup_recall": rec["recall"], "near_dedup_extra_drops": rec["extra_drops"],
                    "exact_select_s": ex["select_s"], "exact_drops": rec["exact_drops"]})
        print(f"[{n}] near_dedup recall {rec['recall']} of {rec['exact_drops']} exact drops, "
              f"{rec['extra_drops']} extra; bands select {ex['select_s']} s", flush=True)
    if not args.skip_plan:
        p = run_child("plan", decisions)
        row.update({"plan_s": p["plan_s"], "plan_peak_rss_mb": p["peak_rss_mb"], "plan_groups": p["groups"],
                    "plan_kept": p["kept"]})
        print(f"[{n}] reshard plan {p['plan_s']} s, peak RSS {p['peak_rss_mb']} MB, {p['kept']} kept", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="*", default=[100_000, 300_000, 1_000_000])
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--recall-at", type=int, default=None, help="Size at which to compare with the exact bands")
    ap.add_argument("--memory-limit", default=None, help="DuckDB memory limit for selection (default: its own)")
    ap.add_argument("--root", default=None, help="Where stores go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="Keep the stores (reruns reuse them)")
    ap.add_argument("--skip-candidates", action="store_true")
    ap.add_argument("--skip-plan", action="store_true")
    ap.add_argument("--plan-kept", type=int, nargs="*", default=[],
                    help="Also dry-run the reshard planner on decision tables alone with these kept counts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    root = args.root or tempfile.mkdtemp(prefix="bench-scale-")
    planner = plan_curve(root, args.plan_kept) if args.plan_kept else None
    sizes = {n: one_size(root, n, args) for n in sorted(args.sizes)}
    out: dict = {"sizes": sizes}
    if sizes:
        exp = exponent([(n, r["select_s"]) for n, r in sizes.items()])
        big = max(sizes)
        out.update({"exponent_select": exp, "exponent_select_cpu": exponent([(n, r["cpu_s"]) for n, r in sizes.items()]),
                    "projection_1e9_rows_s": round(sizes[big]["select_s"] * (1e9 / big) ** exp) if exp else None})
    out.update({"plan_dry_run": planner, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2)})
    print(json.dumps({k: v for k, v in out.items() if k != "sizes"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    if not args.root and not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "select":
            res = child_select(rest[0], rest[1], rest[2] or None, int(rest[3]) if len(rest) > 3 else None)
        elif kind == "candidates":
            res = child_candidates(rest[0])
        elif kind == "recall":
            res = child_recall(rest[0], rest[1])
        else:
            res = child_plan(rest[0])
        print(json.dumps(res))
    else:
        main()
