"""Near-duplicate removal in SQL: keep exactly one sample of each connected group.

Every two samples whose 64-bit hashes differ in at most ``max_distance`` bits are linked, and
exactly one sample of each connected group is kept (so a chain a~b~c or a star around one hub
keeps one, even where the ends are far apart): the one ranked first by the rule's order. Near
pairs are found through bands (pigeonhole: two hashes within distance d agree on at least one
of d+1 bands), groups by min-label propagation in a recursive CTE (``USING KEY``).
"""

from __future__ import annotations

from curation.selection.sqlsafe import ident as q


def _bands(max_distance: int) -> str:
    nb = max_distance + 1
    width = 64 // nb
    bands = []
    for b in range(nb):
        shift = b * width
        mask = (1 << (64 - shift if b == nb - 1 else width)) - 1
        bands.append(f"SELECT _rank, _h, {b} AS band, (_h >> {shift}) & {mask}::UBIGINT AS val FROM _alive")
    return " UNION ALL ".join(bands)


def near_dedup_step(prev: str, column: str, max_distance: int, order: str, label_sql: str) -> str:
    """A CTE body over ``prev`` that marks ``dropped_by = label`` on every kept sample that is not
    its group's first by ``order`` (an ORDER BY list) among samples with a non-NULL hash."""
    alive = (f"SELECT shard, key, ('0x' || {q(column)})::UBIGINT AS _h, row_number() OVER (ORDER BY "
             f"{order}) AS _rank FROM {prev} WHERE dropped_by IS NULL AND {q(column)} IS NOT NULL")
    edges = (f"SELECT DISTINCT a._rank AS src, b._rank AS dst FROM _bands a JOIN _bands b ON a.band = b.band "
             f"AND a.val = b.val AND a._rank <> b._rank WHERE bit_count(xor(a._h, b._h)) <= {max_distance}")
    # every node starts as its own group; a group label is lowered to the smallest rank it touches
    groups = ("SELECT _rank, _rank FROM _alive UNION SELECT e.dst, min(w.grp) FROM _groups w JOIN _edges e ON "
              "w.node = e.src JOIN recurring._groups r ON r.node = e.dst GROUP BY e.dst HAVING min(w.grp) < min(r.grp)")
    dropped = "SELECT a.shard, a.key FROM _alive a JOIN _groups g ON a._rank = g.node WHERE g.grp < a._rank"
    return (
        f"WITH RECURSIVE _alive AS ({alive}), _bands AS ({_bands(max_distance)}), _edges AS ({edges}), "
        f"_groups(node, grp) USING KEY (node) AS ({groups}), _near AS ({dropped}) "
        f"SELECT p.* REPLACE (CASE WHEN p.dropped_by IS NULL AND n.key IS NOT NULL THEN {label_sql} "
        f"ELSE p.dropped_by END AS dropped_by) FROM {prev} p LEFT JOIN _near n ON p.shard = n.shard AND p.key = n.key"
    )
