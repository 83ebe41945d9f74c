"""Selection: rules as classes (``rules``), policies (``policy``) compiled to one DuckDB query
(``policy_sql``, ``near_dedup``) in a sandbox (``sqlsafe``), calibrated thresholds (``calibrate``),
byte-exact resharding (``reshard``, ``reshard_inputs``, ``verified_copy``), the manifest
(``manifest``), and ``curate``: select, reshard, manifest."""
