"""Samples and shards: storage over fsspec (``storage``), the tar scanner (``tarstream``), shards as
tar records (``records``), typed samples per kind (``builders``, ``samples``), the reading API
(``shards.read_shard``), the writer (``writer``), ecosystem openers (``compat``) and the output lock
(``outlock``)."""
