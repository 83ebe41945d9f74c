"""``curate explore``: a read-only local web app over the score store and the shards."""
