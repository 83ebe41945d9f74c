"""Near-duplicate removal in SQL: keep exactly one sample of each connected group.

Every two samples whose 64-bit hashes differ in at most ``d = max_distance`` bits are linked, and
exactly one sample of each connected group is kept (so a chain a~b~c or a star around one hub
keeps one, even where the ends are far apart): the one ranked first by the rule's order.

Finding the near pairs is exact and near-linear (the multi-table scheme of Manku, Jain and Das
Sarma, "Detecting near-duplicates for web crawling", WWW 2007): the 64 bits are cut into ``B``
blocks; two hashes within distance ``d`` differ in at most ``d`` blocks, so they agree exactly on
some ``B - d`` blocks. One table per choice of ``B - d`` blocks (``C(B, d)`` tables) joins
hashes equal on those blocks, and every candidate pair is checked for its real distance, so no
pair is missed and none is invented. ``B`` is sized to the rows: the smallest ``B`` whose tables
key on at least ``log2(rows)`` bits, so a table's bucket holds about one unrelated hash whatever
the pool's size (``d + 1`` blocks of ``64 / (d + 1)`` bits, the pigeonhole bands this replaced,
hold ``rows / 2^12`` at ``d = 4``: quadratic work). Tables stop at ``MAX_TABLES``; past that
(``max_distance`` above about 6 on large pools) buckets grow with the pool.

Groups come from min-label propagation over the found pairs (a recursive CTE, ``USING KEY``),
only over samples that have a near duplicate at all.
"""

from __future__ import annotations

import math
from itertools import combinations
from typing import Any

from curation.selection.sqlsafe import ident as q

MAX_TABLES = 80


def _widths(blocks: int) -> list[int]:
    return [64 // blocks + (1 if i < 64 % blocks else 0) for i in range(blocks)]


def key_bits(blocks: int, max_distance: int) -> int:
    """The fewest bits a table keys on: the ``blocks - d`` narrowest blocks."""
    return sum(sorted(_widths(blocks))[: blocks - max_distance])


def plan_blocks(rows: int, max_distance: int) -> int:
    """How many blocks to cut the hash into for ``rows`` hashes (see the module docstring)."""
    if max_distance == 0:
        return 1
    need = math.log2(max(rows, 2))
    best = max_distance + 1
    for b in range(max_distance + 1, 65):
        if math.comb(b, max_distance) > MAX_TABLES:
            break
        best = b
        if key_bits(b, max_distance) >= need:
            break
    return best


def table_masks(rows: int, max_distance: int, blocks: int | None = None) -> list[int]:
    """One 64-bit mask per table: the bits of ``blocks - d`` of the blocks."""
    b = blocks or plan_blocks(rows, max_distance)
    masks, shift = [], 0
    for w in _widths(b):
        masks.append(((1 << w) - 1) << shift)
        shift += w
    return [sum(c) for c in combinations(masks, b - max_distance)]


def _pairs(alive: str, mask: int, max_distance: int | None, same_dataset: bool, ident: str = "_rid") -> str:
    """One table's candidate pairs (``a.<ident> < b.<ident>``), checked for distance unless it is None."""
    same = " AND a.dataset = b.dataset" if same_dataset else ""
    check = f" WHERE bit_count(xor(a._h, b._h)) <= {max_distance}" if max_distance is not None else ""
    return (f"SELECT a.{ident} AS src, b.{ident} AS dst FROM {alive} a JOIN {alive} b ON (a._h & {mask}::UBIGINT) = "
            f"(b._h & {mask}::UBIGINT){same} AND a.{ident} < b.{ident}{check}")


def near_dedup_steps(chain: Any, column: str, max_distance: int, order: str, label_sql: str, global_scope: bool,
                     blocks: int | None = None) -> None:
    """Add to ``chain`` (``curation.selection.rules.Chain``) the helper tables and the step that mark
    ``dropped_by = label`` on every kept sample that is not its group's first by ``order`` (an ORDER BY
    list) among samples with a non-NULL hash. ``blocks`` forces the block count (``d + 1``: the bands).

    The hashes are held narrow (row id, hash, rank; the dataset only where pairs stay within one),
    and each table's join is its own helper, so one table's hash table is in memory at a time."""
    src = chain.source()
    same = not global_scope and chain.dataset is None
    alive = chain.helper(f"SELECT _rid, {'dataset, ' if same else ''}('0x' || {q(column)})::UBIGINT AS _h FROM {src} "
                         f"WHERE dropped_by IS NULL AND {q(column)} IS NOT NULL")
    found = [chain.helper(_pairs(alive, m, max_distance, same)) for m in table_masks(chain.rows, max_distance, blocks)]
    edges = chain.helper("SELECT DISTINCT src, dst FROM (" + " UNION ALL ".join(f"SELECT * FROM {f}" for f in found) + ")")
    # only samples with a near duplicate are ranked by the preference order: a sort of the few, not of the pool
    ranked = chain.helper(f"SELECT _rid, row_number() OVER (ORDER BY {order}) AS _rank FROM {src} "
                          f"WHERE _rid IN (SELECT src FROM {edges} UNION SELECT dst FROM {edges})")
    ranks = chain.helper(f"SELECT a._rank AS src, b._rank AS dst FROM {edges} e JOIN {ranked} a ON e.src = a._rid "
                         f"JOIN {ranked} b ON e.dst = b._rid")
    # every node starts as its own group; a group label is lowered to the smallest rank it touches
    groups = chain.helper(
        f"WITH RECURSIVE _e AS (SELECT src, dst FROM {ranks} UNION ALL SELECT dst, src FROM {ranks}), "
        f"_g(node, grp) USING KEY (node) AS (SELECT src, src FROM _e GROUP BY src UNION SELECT e.dst, min(w.grp) "
        f"FROM _g w JOIN _e e ON w.node = e.src JOIN recurring._g r ON r.node = e.dst GROUP BY e.dst "
        f"HAVING min(w.grp) < min(r.grp)) "
        f"SELECT a._rid FROM {ranked} a JOIN _g g ON a._rank = g.node WHERE g.grp < a._rank")
    chain.drop_rows(groups, label_sql)


def candidate_pairs_sql(alive: str, rows: int, max_distance: int, blocks: int | None = None) -> str:
    """A query counting the candidate pairs the tables produce over ``alive(dataset, _h, _rank)``
    (before the distance check; a pair found by two tables counts twice): the work near_dedup does."""
    masks = table_masks(rows, max_distance, blocks)
    return "SELECT count(*) FROM (" + " UNION ALL ".join(_pairs(alive, m, None, True, "_rank") for m in masks) + ")"
