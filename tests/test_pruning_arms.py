"""The pruning benchmark's arm logic (benchmarks/pruning): each arm's policy on a hand-written
score store (real Parquet, real DuckDB, the real selection engine), the budgets, and the sets'
held-out combinations and noise (real rendering, tiny sizes)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from benchmarks.pruning import arms as A
from benchmarks.pruning import draw as D
from benchmarks.pruning.model import arm_steps
from benchmarks.pruning.pool import PoolSpec, build_sets
from curation.scoring.store import ScoreStore
from curation.selection.policy import load_policy, run_selection


def _store(tmp_path, rows: list[dict], scorer: str = "basic") -> ScoreStore:
    """One scorer's files holding every column the arms read, one file per dataset."""
    for ds in sorted({r["dataset"] for r in rows}):
        out = tmp_path / "work" / "scores" / scorer / f"dataset={ds}"
        out.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([r for r in rows if r["dataset"] == ds]), out / "00000.parquet")
    return ScoreStore(str(tmp_path / "work"))


def _row(ds: str, i: int, delta: float, loss_large: float, clip: float) -> dict:
    return {"dataset": ds, "shard": "00000", "key": f"{i:04d}", "kind": "pair", "error": None, "clip_score": clip,
            "delta_loss": delta, "loss_large": loss_large}


def _kept(store: ScoreStore, policy: dict) -> dict[str, set[str]]:
    res = run_selection(store, load_policy(policy))
    out: dict[str, set[str]] = {}
    for r in pq.read_table(res.decisions_url, columns=["dataset", "key", "dropped_by"]).to_pylist():
        if r["dropped_by"] is None:
            out.setdefault(r["dataset"], set()).add(r["key"])
    return out


@pytest.fixture
def skewed(tmp_path):
    """Sub-dataset ``big`` (10 rows) scores far above ``small`` (6) on every column: a global top
    half would take ``big`` alone; the arms must take half of each."""
    rows = [_row("big", i, delta=100 + i, loss_large=0.1 * i, clip=0.9 + 0.001 * i) for i in range(10)]
    rows += [_row("small", i, delta=float(i), loss_large=5 + i, clip=0.1 + 0.01 * i) for i in range(6)]
    return _store(tmp_path, rows), {"big": 10, "small": 6}


def test_each_ranked_arm_keeps_the_top_half_of_each_sub_dataset(skewed):
    store, sizes = skewed
    want = {"deltaloss_50": {"big": {"0005", "0006", "0007", "0008", "0009"}, "small": {"0003", "0004", "0005"}},
            # the large proxy's likelihood: the lowest loss_large
            "likelihood_50": {"big": {"0000", "0001", "0002", "0003", "0004"}, "small": {"0000", "0001", "0002"}},
            "clip_50": {"big": {"0005", "0006", "0007", "0008", "0009"}, "small": {"0003", "0004", "0005"}}}
    for arm, kept in want.items():
        assert _kept(store, A.arm_policy(arm, sizes, seed=0, clip_min=0.0)) == kept, arm
    assert {ds: len(k) for ds, k in _kept(store, A.arm_policy("full", sizes, 0, 0.0)).items()} == sizes


def test_clip_then_deltaloss_filters_then_takes_half_of_each_sub_dataset(skewed):
    store, sizes = skewed
    # CLIP >= 0.12 drops small's 0000 and 0001; DeltaLoss then takes n // 2 of what is left
    kept = _kept(store, A.arm_policy("clip_then_deltaloss_50", sizes, seed=0, clip_min=0.12))
    assert kept == {"big": {"0005", "0006", "0007", "0008", "0009"}, "small": {"0003", "0004", "0005"}}
    kept = _kept(store, A.arm_policy("clip_then_deltaloss_50", sizes, seed=0, clip_min=0.135))
    assert kept["small"] == {"0004", "0005"}  # fewer than half pass the filter: all of them, no more


def test_random_half_changes_with_the_seed(tmp_path):
    store = _store(tmp_path, [_row("d", i, 0.0, 0.0, 0.5) for i in range(400)])
    halves = [_kept(store, A.arm_policy("random_50", {"d": 400}, seed, 0.0))["d"] for seed in (0, 1, 0)]
    assert halves[0] == halves[2]  # reproducible by seed
    assert halves[0] != halves[1]
    assert all(150 <= len(h) <= 250 for h in halves)
    assert len(halves[0] & halves[1]) < 0.75 * len(halves[0])  # not the same half shifted slightly


def test_budgets():
    # epochs: a half arm takes half the optimizer steps; steps: every arm takes full data's
    assert arm_steps("epochs", 600, 1200, 4) == 150 and arm_steps("epochs", 1200, 1200, 4) == 300
    assert arm_steps("steps", 600, 1200, 4) == 300
    with pytest.raises(ValueError, match="unknown budget"):
        arm_steps("tokens", 1, 1)


def test_spearman_of_delta_against_the_likelihood(tmp_path):
    # delta_loss = 5 - loss_large ranks exactly as the likelihood; an unrelated order does not
    same = _store(tmp_path / "a", [_row("d", i, 5 - 0.1 * i, 0.1 * i, 0.5) for i in range(8)], "deltaloss")
    assert A.spearman_delta_vs_likelihood(same.work) == pytest.approx(1.0)
    other = _store(tmp_path / "b", [_row("d", i, float((3 * i) % 8), 0.1 * i, 0.5) for i in range(8)], "deltaloss")
    assert abs(A.spearman_delta_vs_likelihood(other.work)) < 0.5


def _truth(root: str) -> list[dict]:
    return pq.read_table(f"{root}/ground_truth.parquet").to_pylist()


def test_heldout_is_disjoint_by_combination_and_the_sets_change_with_the_seed(tmp_path):
    spec = PoolSpec(samples=60, seed=3, per_shard=30)
    sets = build_sets(str(tmp_path / "s"), spec, trusted=20, calib=10, heldout=20, pretrain=40)
    held = set(map(tuple, sets["held"]))
    assert len(held) == D.HELDOUT_PAIRS
    heldout = [json.loads(r["detail"]) for r in _truth(str(tmp_path / "s" / "heldout"))]
    assert heldout and all((d["shape"], d["color"]) in held for d in heldout)
    for part in ("pool", "trusted", "calib", "pretrain"):
        for r in _truth(str(tmp_path / "s" / part)):
            d = json.loads(r["detail"])
            assert (d["shape"], d["color"]) not in held, (part, d)
            said = d.get("caption_describes")
            assert said is None or tuple(said[:2]) not in held
    other = build_sets(str(tmp_path / "t"), PoolSpec(samples=60, seed=4, per_shard=30), trusted=20, calib=10, heldout=20)
    assert set(map(tuple, other["held"])) != held
    assert [r["detail"] for r in other["truth"]] != [r["detail"] for r in sets["truth"]]


def test_pool_noise_has_no_size_or_letter_tells(tmp_path):
    from curation.data.shards import list_shards, read_shard

    sets = build_sets(str(tmp_path / "s"), PoolSpec(samples=200, seed=1, per_shard=100), trusted=8, calib=8, heldout=8)
    truth = {(r["dataset"], r["key"]): r for r in sets["truth"]}
    lo, hi = D.SIZE_RANGE
    for ds, folder in sets["pool"].items():
        for url in list_shards(folder):
            for s in read_shard(url, kind="pair"):
                r = truth[(ds, s.key)]
                im = s.image if isinstance(s.image, Image.Image) else Image.open(io.BytesIO(s.image))
                assert lo <= im.width <= hi and lo <= im.height <= hi
                d = json.loads(r["detail"])
                if r["noise"] == "one_attribute_wrong":
                    said = dict(zip(("shape", "color", "bg", "pos"), d["caption_describes"]))
                    assert sum(said[a] != d[a] for a in said) == 1
                    assert said[d["wrong"]] in s.caption
                if r["noise"] == "word_salad_caption":
                    assert set(s.caption.split()) <= set(D.VOCABULARY)


def test_plateau_needs_three_budgets_and_no_gain_at_the_largest():
    from benchmarks.pruning.run import plateau

    def curve(*acc):
        return [{"steps": 100 * 2 ** i, "accuracy_mean": a} for i, a in enumerate(acc)]

    assert plateau(curve(0.40, 0.55, 0.54))  # the best is not the largest budget
    assert plateau(curve(0.40, 0.55, 0.555))  # the largest gains less than a point
    assert not plateau(curve(0.35, 0.50, 0.65))  # still climbing
    assert not plateau(curve(0.50, 0.50))  # two budgets say nothing


def test_oracle_keeps_no_noise_all_tail_and_head_up_to_half(tmp_path):
    sets = build_sets(str(tmp_path / "s"), PoolSpec(samples=200, seed=2, per_shard=100), trusted=8, calib=8, heldout=8)
    sizes = {ds: sum(r["dataset"] == ds for r in sets["truth"]) for ds in sets["pool"]}
    keys = A.oracle_keys(sets["truth"], sizes, seed=2)
    truth = {(r["dataset"], r["key"]): r for r in sets["truth"]}
    for ds, n in sizes.items():
        kept = [truth[(ds, k)] for k in keys[ds]]
        assert len(kept) == n // 2
        assert all(r["noise"] == "clean" for r in kept)
        tail = {r["key"] for r in sets["truth"] if r["dataset"] == ds and r["noise"] == "clean"
                and json.loads(r["detail"])["group"] == "tail"}
        assert tail <= set(keys[ds])  # the pool's tail is under half: all of it, head fills the rest
    # the selection engine keeps exactly those keys
    rows = [{**_row(r["dataset"], 0, 0.0, 0.0, 0.5), "key": r["key"]} for r in sets["truth"]]
    kept = _kept(_store(tmp_path, rows), A.arm_policy("oracle_50", sizes, 2, 0.0, keys))
    assert kept == {ds: set(v) for ds, v in keys.items()}
    with pytest.raises(ValueError, match="ground-truth"):
        A.arm_policy("oracle_50", sizes, 2, 0.0)


def test_proxy_data_follows_the_pools_sources_without_noise_or_heldout_pairs(tmp_path):
    spec = PoolSpec(samples=100, seed=5, per_shard=100)
    sets = build_sets(str(tmp_path / "s"), spec, trusted=8, calib=8, heldout=8, proxy_trusted=300)
    rows = [json.loads(r["detail"]) for r in _truth(str(tmp_path / "s" / "proxy_trusted"))]
    assert len(rows) == 300
    held = set(map(tuple, sets["held"]))
    assert all((d["shape"], d["color"]) not in held for d in rows)
    heads = {ds: {tuple(c) for c in combos} for ds, combos in sets["heads"].items()}
    head = [d for d in rows if d["group"] == "head"]
    assert 0.5 < len(head) / len(rows) < 0.7  # the pool's head share of clean data (0.6)
    assert all((d["shape"], d["color"], d["bg"]) in heads[d["source"]] for d in head)
    assert all((d["shape"], d["color"], d["bg"]) not in heads[d["source"]] for d in rows if d["group"] == "tail")
    assert 0.5 < sum(d["source"] == "sft_a" for d in rows) / len(rows) < 0.7


def test_benchmark_proxies_have_the_chosen_sizes_and_share_their_data(tmp_path):
    from benchmarks.pruning.run import proxy_sizes
    from training_hooks.proxies import train_proxies

    sets = build_sets(str(tmp_path / "s"), PoolSpec(samples=40, seed=6, per_shard=40), trusted=8, calib=8, heldout=8,
                      proxy_trusted=24)
    (small, large), lr = proxy_sizes("weak")
    assert lr and proxy_sizes("tiny") == (("tiny", large), None)
    # the benchmark's large proxy is bootstrap's "small" NVILA; "tiny" keeps this test fast
    res = train_proxies(sets["proxy_trusted"], str(tmp_path / "p"), steps=2, batch_size=4, max_rounds=1, round_steps=2,
                        info=lambda t: None, converge_small=True, image_mode="resize", sizes=(small, "tiny"), small_lr=lr)
    # the weak small proxy is a far smaller model than the other, both trained on the same data
    assert res["large"]["parameters"] > 5 * res["small"]["parameters"]
    record = json.loads((tmp_path / "p" / "proxies.json").read_text())
    assert record["small"]["steps"] == record["large"]["steps"] == 2


def test_arms_option_keeps_full_data_and_targets_skip_what_did_not_run():
    from benchmarks.pruning.run import arm_list, targets

    assert set(arm_list("capability", ["capability"])) == set(A.ARMS + A.DIAGNOSTIC_ARMS)
    only = arm_list("capability", ["capability", "reference"], ["deltaloss_50"])
    assert only == {"full": ("full", "capability"), "deltaloss_50": ("deltaloss_50", "capability"),
                    "deltaloss_reference_50": ("deltaloss_50", "reference")}

    def summary(**acc):
        return {"arms": {a: {"accuracy_mean": v} for a, v in acc.items()}, "full_best": {"accuracy_mean": 0.55},
                "full_plateau": True}

    t = targets(summary(full=0.55, deltaloss_50=0.545, likelihood_50=0.50))
    assert t == {"full data at its plateau": True, "deltaloss_50 >= full_best - 1pt": True,
                 "deltaloss_50 >= likelihood_50": True}
    t = targets(summary(full=0.55, random_50=0.52, deltaloss_50=0.53, clip_then_deltaloss_50=0.56))
    assert not t["deltaloss_50 >= full_best - 1pt"] and not t["deltaloss_50 >= random_50 + 3pt"]
    assert t["clip_then_deltaloss_50 >= full_best"]


def test_diagnosis_counts_the_top_half_of_each_sub_dataset_by_ground_truth():
    from benchmarks.pruning.diagnose import top_half_shares

    def truth(key, noise="clean", grp="tail"):
        return {"noise": noise, "detail": json.dumps({"group": grp}), "key": key}

    t = {("a", "1"): truth("1", grp="head"), ("a", "2"): truth("2"), ("a", "3"): truth("3", "word_salad_caption"),
         ("a", "4"): truth("4", grp="head"), ("b", "5"): truth("5"), ("b", "6"): truth("6", "blank_image")}
    rows = [("a", "1", 0.1), ("a", "2", 0.9), ("a", "3", 2.0), ("a", "4", 0.0), ("b", "5", 0.2), ("b", "6", 0.5)]
    # a: salad and the tail sample on top; b: the blank image; so 2 noise, 1 tail of 3 kept
    assert top_half_shares(rows, {"a": 4, "b": 2}, t, 2) == {"noise": 0.667, "tail": 0.333}
    assert top_half_shares(rows, {"a": 4, "b": 2}, t, 2, ascending=True) == {"head": 0.667, "tail": 0.333}
