"""`curate reshard` as a user runs it vs copies of the same bytes, timed in one run, every arm
given the same parallelism.

Writes a corpus of shards whose members have realistic sizes (JPEG-sized random payloads,
captions, img2dataset JSON), scores it with the ``basic`` scorer (the real engine writes the
score store), then times on the same files, page cache warm, arms alternating:

- least verified copy, W processes: the least any verified copy must do, each input shard read
  and written to a new file (1 MiB chunks, no parsing) with an md5 of what it writes and an
  fsync per file, the shards shared out to W worker processes (a pool started before timing);
- ours on Ray, W workers: ``curation.selection.curate.curate``, what ``curate reshard`` runs:
  selection in DuckDB, resharding (every input hashed as it is read and checked against the
  checksum it was scored with, members copied byte for byte, md5 of every output shard, one
  fsync per shard, stats, wids index) and the manifest, groups of shards as tasks on a local
  Ray of W CPUs started before timing (as a cluster would be);
- copy with both hashes, W processes: the least verified copy plus an XXH3-128 of what it reads
  (the hash local shards are scored with), on the same buffer: the least copy that gives resharding's
  two guarantees (for the record);
- the same pair at one process: the least verified copy in one process, and ``curate`` in one
  process without Ray (for the record);
- plain copy, W processes: the copy without md5 or fsync (for the record, not a target).

W is ``--workers`` (2). Each arm runs --repeats times; the best wall time of each is reported,
and its CPU seconds per GB of input from its median repeat: this process and every process it
started (pool workers, Ray workers), read from /proc (``flows.cputime``); Ray's own daemons
(raylet, GCS) are given apart, as ``ray_system_cpu_s_per_gb``. The load average before and after
the timed arms goes into the JSON. Before each arm the page cache's dirty pages are written back
(``os.sync``, outside the timing), so that no arm pays for the writeback of the files the arm
before it wrote and deleted, and the order of the arms turns by one each repeat, so that no arm
always follows the same one; one untimed run of the least verified copy and of the Ray arm comes
first. Each arm's busy CPU seconds of the whole machine (/proc/stat, kernel writeback included)
are given beside its own, as ``machine_cpu_s_per_gb``. Targets, at W: ours' CPU seconds per GB
<= 1.15 x the least verified copy's, and its rate >= 0.9 x the least verified copy's. The `curate reshard` command is
also run once as a subprocess (Python start-up and Ray start included); that time is printed but
not in the ratios.

With two sizes or more (``--samples 20000 40000 80000``) every arm runs on each corpus and the
JSON adds, between the first and the last size, the marginal CPU seconds per GB (the difference of
the median CPU seconds over the difference of the sizes: per-run costs such as selection in DuckDB,
planning, the manifest and Ray's task start cancel) and each arm's growth exponent (CPU s ~
size^k). Each size also records the peak RSS of the Ray workers that resharded it (VmHWM; Ray
is started afresh per size).

What bounds the ratios: resharding hashes every byte twice (the input against the checksum it was
scored with, XXH3-128 for local shards; the output for the md5 the wids index records), the least
verified copy once (md5): at 1.53 (md5) and 0.03 (XXH3-128) CPU seconds per GB here (1 MiB
updates, one thread; BLAKE3, the input hash before, 0.28-0.39), the copy with both hashes costs
about 1.02x the least verified copy, and the rest of the 1.15x allowed is resharding's own work
(parsing tar headers, grouping samples, writing shards, the manifest). A plain copy from the
page cache runs at memory speed; the output md5 alone keeps anything that writes a wids index
well below it on 2 cores.

    python benchmarks/bench_reshard.py [--samples 20000 [40000 ...]] [--keep 1.0] [--workers 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# Ray runs its workers at nice 15 by default; on a machine shared with other work they would get
# less CPU than the copies they are compared with. Every arm runs at the same priority here.
os.environ.setdefault("RAY_worker_niceness", "0")


def make_corpus(root: str, samples: int, per_shard: int, seed: int = 0) -> str:
    """Shards under ``root/in/bench``, scored by ``basic`` into ``root/work``; returns the shard folder."""
    from curation.scoring.engine import ScorerSpec, ShardTask, score_local
    from curation.data.shards import list_shards
    from curation.data.writer import ShardWriter

    rng = np.random.default_rng(seed)
    shard_dir = f"{root}/in/bench"
    with ShardWriter(shard_dir, max_samples=per_shard) as w:
        for i in range(samples):
            key = f"{i:09d}"
            size = int(rng.lognormal(np.log(40_000), 0.6))
            w.write({"__key__": key, "jpg": rng.integers(0, 256, size, dtype=np.uint8).tobytes(),
                     "txt": f"caption number {i}".encode(), "json": json.dumps({"key": key, "w": 256}).encode()})
    tasks = [ShardTask(u, "bench", "pair") for u in list_shards(shard_dir)]
    report = score_local(tasks, ScorerSpec("basic", batch_size=256), f"{root}/work")
    assert not report.failed, report.failed
    return shard_dir


def write_policy(path: str, keep: float) -> str:
    """Keep everything (the payloads are random bytes, not images: errors are kept), or a
    pseudo-random ``keep`` fraction of it (ranked by sha256)."""
    rule = {"rule": "dedup", "column": "sha256"} if keep >= 1 else \
        {"rule": "top_fraction", "column": "sha256", "fraction": keep}
    with open(path, "w") as f:
        json.dump({"drop_errors": False, "defaults": [rule]}, f)
    return path


def copy_file(job: tuple[str, str, str]) -> int:
    """cp of one shard; ``verified`` adds an md5 of what is written and an fsync, ``checked`` also an
    XXH3-128 of what is read (resharding's two hashes, on one buffer; the hash shards are scored with)."""
    import xxhash

    url, dst_path, mode = job
    md5, check = hashlib.md5(), xxhash.xxh3_128()
    with open(url, "rb", buffering=0) as src, open(dst_path, "wb", buffering=0) as dst:
        while chunk := src.read(1 << 20):
            if mode == "checked":
                check.update(chunk)
            if mode != "plain":
                md5.update(chunk)
            dst.write(chunk)
        if mode != "plain":
            os.fsync(dst.fileno())
    md5.hexdigest(), check.hexdigest()
    return os.path.getsize(dst_path)


def plain_copy(urls: list[str], out: str, verified: str, pool: ProcessPoolExecutor | None) -> float:
    """Every input shard copied, in this process or shared out to ``pool``'s processes."""
    os.makedirs(out, exist_ok=True)
    jobs = [(url, os.path.join(out, os.path.basename(url)), verified) for url in urls]
    t0 = time.perf_counter()
    if pool is None:
        for job in jobs:
            copy_file(job)
    else:
        list(pool.map(copy_file, jobs, chunksize=1))
    return time.perf_counter() - t0


def ours(work: str, policy: str, out: str, max_samples: int, workers: int, use_ray: bool) -> tuple[float, int]:
    """(wall seconds of curate, samples written)."""
    from curation.selection.curate import curate
    from curation.selection.reshard import ReshardConfig

    t0 = time.perf_counter()
    manifest, _ = curate(work, policy, out, ReshardConfig(max_samples=max_samples, workers=workers), use_ray=use_ray)
    return time.perf_counter() - t0, sum(o.samples for o in manifest.outputs.values())


def cli_once(work: str, policy: str, out: str, max_samples: int, workers: int) -> float:
    exe = shutil.which("curate", path=os.path.dirname(sys.executable)) or "curate"
    t0 = time.perf_counter()
    subprocess.run([exe, "reshard", "--policy", policy, "--out", out, "--work", work, "--max-samples", str(max_samples),
                    "--workers", str(workers)], check=True, capture_output=True)
    return time.perf_counter() - t0


RAY_SYSTEM = ("raylet", "gcs_server", "/ray/_private/", "/ray/dashboard/", "/ray/autoscaler/")


def _is_ray_system(cmd: str) -> bool:
    return not cmd.startswith("ray::") and any(m in cmd for m in RAY_SYSTEM)


def _cpu() -> tuple[float, float]:
    """(CPU s of this process, its pool and Ray workers, and whatever they reaped; Ray daemons' own CPU s)."""
    from flows.cputime import process_tree

    tree = process_tree().values()
    work = sum(reaped + (0.0 if _is_ray_system(cmd) else own) for cmd, own, reaped in tree)
    return work, sum(own for cmd, own, _ in tree if _is_ray_system(cmd))


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _machine_cpu() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat: user, nice, system, irq, softirq;
    not idle, iowait or steal): on a quiet machine, an arm's own cost plus the kernel's writeback
    threads, which no process's counters hold and which fall on either arm by timing."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:8]
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields)
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def _ray_worker_peak_rss_mb() -> float:
    """The largest peak RSS (VmHWM) of this run's live Ray worker processes, the processes that
    reshard in the Ray arm (they are started per corpus, so the peak is this corpus')."""
    from flows.cputime import process_tree

    peaks = []
    for pid, (cmd, _, _) in process_tree().items():
        if cmd.startswith("ray::") or "default_worker.py" in cmd:
            try:
                with open(f"/proc/{pid}/status") as f:
                    peaks += [int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")]
            except OSError:
                pass
    return round(max(peaks, default=0.0), 1)


def _arms(w: int) -> list[tuple[str, str, bool, str]]:
    """(name, kind, parallel, copy mode) in the order they alternate."""
    return [(f"verified_copy_{w}", "copy", True, "verified"), (f"ours_ray{w}", "ours", True, ""),
            (f"checked_copy_{w}", "copy", True, "checked"), ("verified_copy_1", "copy", False, "verified"),
            ("ours_1", "ours", False, ""), (f"copy_{w}", "copy", True, "plain")]


def warm_up(urls: list[str], work: str, policy: str, dst: str, args: argparse.Namespace, pool: ProcessPoolExecutor) -> None:
    """One untimed run of the least verified copy and of the Ray arm: the first write of a corpus's
    size on this file system, and the Ray workers' start and imports, are paid before timing (a
    fresh corpus's first arm cost up to twice its later repeats here, whichever arm it was)."""
    plain_copy(urls, dst, "verified", pool)
    shutil.rmtree(dst)
    ours(work, policy, dst, args.max_samples, args.workers, use_ray=True)
    shutil.rmtree(dst)


def run_arms(args: argparse.Namespace, samples: int) -> dict:
    """Build and score a corpus of ``samples``, then time every arm ``args.repeats`` times, alternating."""
    import ray

    from curation.common.raycluster import ensure_ray
    from curation.data.shards import list_shards

    w = args.workers
    arms = _arms(w)
    times: dict[str, list[float]] = {a[0]: [] for a in arms}
    cpu: dict[str, list[float]] = {a[0]: [] for a in arms}
    machine: dict[str, list[float]] = {a[0]: [] for a in arms}
    ray_sys: list[float] = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as root, \
            ProcessPoolExecutor(max_workers=w, mp_context=multiprocessing.get_context("spawn")) as pool:
        t0 = time.perf_counter()
        urls = list_shards(make_corpus(root, samples, args.per_shard))
        setup_s = time.perf_counter() - t0
        policy, work = write_policy(f"{root}/policy.json", args.keep), f"{root}/work"
        list(pool.map(time.sleep, [0.5] * w))  # every worker process started before timing
        ensure_ray(num_cpus=w)
        warm_up(urls, work, policy, f"{root}/warm", args, pool)
        load0 = os.getloadavg()
        for r in range(args.repeats):
            for name, kind, parallel, verified in arms[r % len(arms):] + arms[: r % len(arms)]:
                os.sync()  # no arm pays for writing back the files of the arm before it
                (c0, s0), m0, dst = _cpu(), _machine_cpu(), f"{root}/{name}-{r}"
                if kind == "copy":
                    wall = plain_copy(urls, dst, verified, pool if parallel else None)
                else:
                    wall, kept = ours(work, policy, dst, args.max_samples, w, use_ray=parallel)
                (c1, s1), m1 = _cpu(), _machine_cpu()
                machine[name].append(m1 - m0)
                times[name].append(wall)
                cpu[name].append(c1 - c0)
                if kind == "ours" and parallel:
                    ray_sys.append(s1 - s0)
                shutil.rmtree(dst)
        worker_rss = _ray_worker_peak_rss_mb()
        ray.shutdown()
        load = os.getloadavg()
        cli_s = None if args.no_cli else cli_once(work, policy, f"{root}/cli", args.max_samples, w)
        total = sum(os.path.getsize(u) for u in urls)
    best = {k: min(range(len(v)), key=v.__getitem__) for k, v in times.items()}  # the fastest repeat of each arm
    gb = total / 1e9
    median = {k: _median(v) for k, v in cpu.items()}
    machine_median = {k: _median(v) for k, v in machine.items()}
    return {"input_mb": round(total / 1e6, 1), "samples": samples, "kept": kept, "shards": len(urls),
            "cpus": os.cpu_count(), "workers": w, "setup_s": round(setup_s, 1), "repeats": args.repeats,
            "load_average": {"before": [round(x, 2) for x in load0], "after": [round(x, 2) for x in load]},
            "mb_per_s": {k: round(total / 1e6 / v[best[k]], 1) for k, v in times.items()},
            "seconds": {k: [round(x, 2) for x in v] for k, v in times.items()},
            "cpu_s": {k: [round(x, 2) for x in v] for k, v in cpu.items()},
            "cpu_s_median": {k: round(v, 3) for k, v in median.items()},
            "cpu_s_per_gb": {k: round(v / gb, 2) for k, v in median.items()},  # each arm's median repeat
            "machine_cpu_s_median": {k: round(v, 3) for k, v in machine_median.items()},
            "machine_cpu_s_per_gb": {k: round(v / gb, 2) for k, v in machine_median.items()},
            "ray_system_cpu_s_per_gb": round(ray_sys[best[f"ours_ray{w}"]] / gb, 2),
            "ray_worker_peak_rss_mb": worker_rss,
            "cli_wall_s": round(cli_s, 2) if cli_s else None}


def report(result: dict) -> None:
    rate, cpu, w = result["mb_per_s"], result["cpu_s_per_gb"], result["workers"]
    for n, ours_arm in ((w, f"ours_ray{w}"), (1, "ours_1")):
        base = f"verified_copy_{n}"
        result[f"{ours_arm}_vs_verified_copy"] = round(rate[ours_arm] / rate[base], 3)
        result[f"{ours_arm}_cpu_vs_verified_copy"] = round(cpu[ours_arm] / cpu[base], 3)
    result["reshard_vs_verified_copy"] = result[f"ours_ray{w}_vs_verified_copy"]
    result["reshard_cpu_vs_verified_copy"] = result[f"ours_ray{w}_cpu_vs_verified_copy"]
    result["reshard_vs_copy"] = round(rate[f"ours_ray{w}"] / rate[f"copy_{w}"], 3)
    result["reshard_vs_checked_copy"] = round(rate[f"ours_ray{w}"] / rate[f"checked_copy_{w}"], 3)
    result["reshard_cpu_vs_checked_copy"] = round(cpu[f"ours_ray{w}"] / cpu[f"checked_copy_{w}"], 3)
    mach = result["machine_cpu_s_per_gb"]
    result["reshard_machine_cpu_vs_verified_copy"] = round(mach[f"ours_ray{w}"] / mach[f"verified_copy_{w}"], 3)
    print(f"{result['samples']} samples, {result['input_mb']:.0f} MB in {result['shards']} shards, keeping "
          f"{result['kept']}; best of {result['repeats']}, {result['cpus']} CPUs, {w} workers")
    print(f"  {'arm':<38} {'MB/s':>8} {'CPU s/GB':>9} {'machine':>8}   (MB/s: best repeat; CPU s/GB: median repeat;"
          f" machine: the whole machine's busy CPU s/GB, kernel writeback included)")
    labels = {f"verified_copy_{w}": f"least verified copy, {w} processes", f"ours_ray{w}": f"curate reshard, Ray, {w} workers",
              f"checked_copy_{w}": f"copy with both hashes, {w} processes",
              "verified_copy_1": "least verified copy, 1 process", "ours_1": "curate reshard, 1 process",
              f"copy_{w}": f"plain copy, {w} processes (no target)"}
    for arm, label in labels.items():
        print(f"  {label:<38} {rate[arm]:8.1f} {cpu[arm]:9.2f} {mach[arm]:8.2f}")
    print(f"  Ray's daemons (raylet, GCS) during the Ray arm: {result['ray_system_cpu_s_per_gb']:.2f} CPU s/GB (not in the above);"
          f" peak RSS of a Ray worker {result['ray_worker_peak_rss_mb']:.0f} MB")
    print(f"  {w} workers each: rate {result['reshard_vs_verified_copy']:.3f} of the least verified copy (target >= 0.9), "
          f"CPU s/GB {result['reshard_cpu_vs_verified_copy']:.3f} x (target <= 1.15); the whole machine's: "
          f"{result['reshard_machine_cpu_vs_verified_copy']:.3f} x")
    print(f"  vs the copy with both hashes ({w} each): rate {result['reshard_vs_checked_copy']:.3f}, "
          f"CPU s/GB {result['reshard_cpu_vs_checked_copy']:.3f} x")
    print(f"  load average (1, 5, 15 min) before / after the timed arms: {result['load_average']['before']} / "
          f"{result['load_average']['after']}")
    print(f"  1 process each:  rate {result['ours_1_vs_verified_copy']:.3f}, CPU s/GB {result['ours_1_cpu_vs_verified_copy']:.3f} x"
          f"   plain copy: {result['reshard_vs_copy']:.3f} (bounded by the output md5; not a target)")
    if result["cli_wall_s"]:
        print(f"  `curate reshard` as a subprocess, once: {result['cli_wall_s']:.1f} s wall (Python start-up and Ray "
              f"start included)")


def marginal(small: dict, large: dict) -> dict:
    """What one more GB costs each arm: the difference of the two corpora's median CPU seconds over
    the difference of their sizes (per-run costs, the same at both sizes, cancel), and the ratios."""
    gb = (large["input_mb"] - small["input_mb"]) / 1e3

    def per_gb_of(field: str) -> dict[str, float]:
        return {k: round((large[field][k] - small[field][k]) / gb, 2) for k in small[field]}

    per_gb, machine = per_gb_of("cpu_s_median"), per_gb_of("machine_cpu_s_median")
    w = small["workers"]
    span = math.log(large["input_mb"] / small["input_mb"])
    exponent = {k: round(math.log(large["cpu_s_median"][k] / small["cpu_s_median"][k]) / span, 3)
                for k in small["cpu_s_median"]}  # CPU s ~ size^exponent between the two corpora
    out = {"gb": round(gb, 3), "cpu_s_per_gb": per_gb, "machine_cpu_s_per_gb": machine, "cpu_growth_exponent": exponent,
           "reshard_machine_cpu_vs_verified_copy": round(machine[f"ours_ray{w}"] / machine[f"verified_copy_{w}"], 3),
           "reshard_cpu_vs_verified_copy": round(per_gb[f"ours_ray{w}"] / per_gb[f"verified_copy_{w}"], 3),
           "reshard_cpu_vs_checked_copy": round(per_gb[f"ours_ray{w}"] / per_gb[f"checked_copy_{w}"], 3),
           "ours_1_cpu_vs_verified_copy": round(per_gb["ours_1"] / per_gb["verified_copy_1"], 3)}
    print(f"marginal CPU s per GB, {small['input_mb']:.0f} -> {large['input_mb']:.0f} MB (per-run costs cancel):")
    for arm, v in per_gb.items():
        print(f"  {arm:<38} {v:9.2f} {machine[arm]:8.2f} (the whole machine's)")
    print(f"  {w} workers each: curate reshard {out['reshard_cpu_vs_verified_copy']:.3f} x the least verified copy, "
          f"{out['reshard_cpu_vs_checked_copy']:.3f} x the copy with both hashes; 1 process: "
          f"{out['ours_1_cpu_vs_verified_copy']:.3f} x; the whole machine's: {out['reshard_machine_cpu_vs_verified_copy']:.3f} x")
    print(f"  growth exponent of CPU s with size: curate reshard (Ray) {exponent[f'ours_ray{w}']:.3f}, "
          f"least verified copy {exponent[f'verified_copy_{w}']:.3f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, nargs="+", default=[20000],
                    help="corpus size(s) in samples (20000: about 1 GB); two sizes also give the marginal CPU per GB")
    ap.add_argument("--per-shard", type=int, default=1000)
    ap.add_argument("--max-samples", type=int, default=1000, help="samples per output shard")
    ap.add_argument("--keep", type=float, default=1.0, help="fraction of samples kept")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2, help="processes of every parallel arm (Ray workers, copy processes)")
    ap.add_argument("--no-cli", action="store_true", help="skip the timed `curate reshard` subprocess")
    ap.add_argument("--json")
    args = ap.parse_args()
    runs = []
    for samples in args.samples:
        runs.append(run_arms(args, samples))
        report(runs[-1])
    result = runs[0] if len(runs) == 1 else {"runs": runs, "marginal": marginal(runs[0], runs[-1])}  # first and last size
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
