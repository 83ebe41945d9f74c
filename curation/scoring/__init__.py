"""Scoring: recipes (``recipe``) resolved once into a plan with a content key (``plan``), the engine
(``engine``) with its Ray actors (``workers``) writing one score file per shard (``scorefile``), the
score store over DuckDB (``store``), and DFN filter training (``dfn``)."""
