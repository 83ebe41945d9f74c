"""Selection policies on a small score store written by hand (real Parquet, real DuckDB):
sandboxed ``sql`` rules, near-dedup by connected groups, empty policies."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from curation.app.cli import app
from curation.selection.policy import PolicyError, load_policy, run_selection
from curation.selection.sqlsafe import sandbox
from curation.scoring.store import ScoreStore

H0 = 0x0123_4567_89AB_CDEF


def _flip(h: int, *bits: int) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def _row(key: str, phash: int | None = None, clip: float = 0.5, words: int = 3, ds: str = "web") -> dict:
    return {"dataset": ds, "shard": "00000", "key": key, "kind": "pair", "error": None,
            "phash": None if phash is None else f"{phash:016x}", "clip_score": clip, "caption_words": words}


def _work(tmp_path, rows: list[dict]) -> str:
    """A score store of one scorer, ``basic``, holding ``rows``."""
    work = tmp_path / "work"
    for ds in sorted({r["dataset"] for r in rows}):
        out = work / "scores" / "basic" / f"dataset={ds}"
        out.mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist([r for r in rows if r["dataset"] == ds]), out / "00000.parquet")
    return str(work)


def _decide(work: str, policy: dict) -> dict[str, str | None]:
    result = run_selection(ScoreStore(work), load_policy(policy))
    return {x["key"]: x["dropped_by"] for x in pq.read_table(result.decisions_url).to_pylist()}


def _near(max_distance: int = 4, prefer: str | None = None) -> dict:
    rule = {"rule": "near_dedup", "column": "phash", "max_distance": max_distance}
    if prefer:
        rule["prefer"] = prefer
    return {"datasets": {"web": [rule]}}


# --------------------------------------------------------------------------- near_dedup


def test_near_dedup_keeps_one_per_chain(tmp_path):
    # a ~ m ~ z (3 bits apart each), a and z 6 bits apart; m ranks last by key, so a rule that
    # only looks for a better-ranked neighbour would keep both a and z
    rows = [_row("a", H0), _row("z", _flip(H0, 1, 2, 3, 40, 41, 42)), _row("m", _flip(H0, 1, 2, 3)),
            _row("far", ~H0 & (2**64 - 1)), _row("nohash")]
    decided = _decide(_work(tmp_path, rows), _near())
    assert decided == {"a": None, "m": "near_dedup:phash", "z": "near_dedup:phash", "far": None, "nohash": None}


def test_near_dedup_keeps_one_per_star(tmp_path):
    # a hub h with five leaves, each 3 bits from h and 6 from every other leaf
    leaves = {f"leaf{i}": _flip(H0, 10 * i, 10 * i + 1, 10 * i + 2) for i in range(5)}
    rows = [_row(k, h) for k, h in leaves.items()] + [_row("zhub", H0)]
    # a second, separate star keeps its own one
    rows += [_row(f"other{i}", _flip(~H0 & (2**64 - 1), i)) for i in range(3)]
    decided = _decide(_work(tmp_path, rows), _near())
    kept = sorted(k for k, r in decided.items() if r is None)
    assert kept == ["leaf0", "other0"]  # the first by (shard, key) in each group
    assert all(r == "near_dedup:phash" for k, r in decided.items() if k not in kept)


def test_near_dedup_prefer_picks_the_representative(tmp_path):
    leaves = {f"leaf{i}": _flip(H0, 10 * i, 10 * i + 1, 10 * i + 2) for i in range(4)}
    rows = [_row(k, h, clip=0.1) for k, h in leaves.items()] + [_row("zhub", H0, clip=0.9)]
    decided = _decide(_work(tmp_path, rows), _near(prefer="clip_score"))
    assert [k for k, r in decided.items() if r is None] == ["zhub"]


def test_near_dedup_only_links_samples_still_kept(tmp_path):
    # the middle of the chain is dropped by an earlier rule: the ends are no longer linked
    rows = [_row("a", H0), _row("m", _flip(H0, 1, 2, 3), words=0), _row("z", _flip(H0, 1, 2, 3, 40, 41, 42))]
    policy = {"datasets": {"web": [{"rule": "valid", "decodable": False, "min_caption_words": 1},
                                   {"rule": "near_dedup", "column": "phash", "max_distance": 4}]}}
    decided = _decide(_work(tmp_path, rows), policy)
    assert decided == {"a": None, "m": "valid:min_caption_words", "z": None}


# --------------------------------------------------------------------------- sql rules


def _sql_policy(expr: str) -> dict:
    return {"datasets": {"web": [{"rule": "valid", "decodable": False, "min_caption_words": 1},
                                 {"rule": "sql", "name": "custom", "keep_where": expr}]}}


READ_FILE = "(SELECT count(*) FROM read_text('/etc/hostname')) = 1"


def test_sql_rule_runs_an_expression(tmp_path):
    rows = [_row("a", clip=0.9), _row("b", clip=0.2), _row("c", clip=0.7, words=1)]
    work = _work(tmp_path, rows)
    decided = _decide(work, _sql_policy("clip_score > 0.5 AND \"caption_words\" >= 2"))
    assert decided == {"a": None, "b": "custom", "c": "custom"}
    decided = _decide(work, _sql_policy("len(list_filter([clip_score, 0.1], lambda x: x > 0.75)) >= 1"))
    assert decided == {"a": None, "b": "custom", "c": "custom"}


@pytest.mark.parametrize("expr,why", [
    (READ_FILE, "subqueries are not allowed"),
    ("clip_score IN (SELECT 1)", "subqueries are not allowed"),
    ("clip_score > 0); COPY (SELECT 1) TO '{out}'; WITH t AS (SELECT 1", "unbalanced parentheses"),
    ("clip_score > 0; COPY (SELECT 1) TO '{out}'", "';' ends a statement"),
    ("(clip_score > 0", "unbalanced parentheses"),
    ("clip_score > 0 -- keep", "comments are not allowed"),
    ("clip_score > 0 ORDER BY key", "not an SQL expression"),
    ("", "empty expression"),
])
def test_sql_rule_that_is_not_one_expression_is_refused_at_load(tmp_path, expr, why):
    out = tmp_path / "x.csv"
    policy = _sql_policy(expr.format(out=out))
    with pytest.raises(PolicyError, match=rf"datasets\.web\[1\]\.keep_where: .*{why}"):
        load_policy(policy)
    # the same through the command line, from a policy file: refused, nothing written
    work = _work(tmp_path, [_row("a")])
    (tmp_path / "p.yaml").write_text(f"datasets:\n  web:\n    - rule: sql\n      keep_where: {json.dumps(expr.format(out=out))}\n")
    r = CliRunner().invoke(app, ["select", "--policy", str(tmp_path / "p.yaml"), "--work", work])
    assert r.exit_code == 2 and "keep_where" in r.output, r.output
    assert not out.exists()
    assert not (tmp_path / "work" / "selection").exists()


def test_selection_runs_in_a_sandbox(tmp_path):
    """Whatever got past the parser would run where files, settings and extensions are out of reach:
    the score columns are in the engine's own table, the score files and views are not."""
    import glob

    import duckdb

    from curation.selection.runner import _load
    from curation.selection.sqlsafe import engine

    store = ScoreStore(_work(tmp_path, [_row("a")]))
    result = tmp_path / "result.parquet"
    con = engine({"memory_limit": "256MB", "temp_directory": str(tmp_path / "spill")})
    _load(store, con, ["dataset", "key", "clip_score"], None)
    sandbox(con, [str(result)])
    assert con.sql("SELECT key, clip_score FROM s0").fetchall() == [("a", 0.5)]
    score_file = glob.glob(str(tmp_path / "work" / "scores" / "*" / "*" / "*.parquet"))[0]
    out = tmp_path / "y.csv"
    for stmt in ("SELECT * FROM read_text('/etc/hostname')", f"SELECT * FROM read_parquet('{score_file}')",
                 f"COPY (SELECT 1) TO '{out}'", f"ATTACH '{tmp_path / 'db.duckdb'}'", "INSTALL httpfs", "LOAD httpfs"):
        with pytest.raises(duckdb.Error, match="disabled|Permission"):
            con.execute(stmt)
    with pytest.raises(duckdb.Error, match="scores"):
        con.execute("SELECT * FROM scores")  # the views over the score files are gone
    for setting in ("enable_external_access = true", f"allowed_paths = ['{tmp_path}']", "temp_directory = '/tmp'"):
        with pytest.raises(duckdb.Error, match="locked|disabled"):
            con.execute(f"SET {setting}")
    assert not out.exists() and not (tmp_path / "db.duckdb").exists()
    con.close()


# --------------------------------------------------------------------------- empty policies


@pytest.mark.parametrize("text", ["", "# nothing here\n", "{}\n"])
def test_empty_policy_file_is_refused(tmp_path, text):
    (tmp_path / "empty.yaml").write_text(text)
    with pytest.raises(PolicyError, match="is empty"):
        load_policy(str(tmp_path / "empty.yaml"))
    r = CliRunner().invoke(app, ["select", "--policy", str(tmp_path / "empty.yaml"),
                                 "--work", _work(tmp_path, [_row("a")])])
    assert r.exit_code == 2 and "is empty" in r.output
    assert not os.path.exists(tmp_path / "work" / "selection")
