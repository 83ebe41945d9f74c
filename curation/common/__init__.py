"""Helpers every floor shares: one YAML loader (``yamlfile``), the Ray connection (``raycluster``), read-ahead (``prefetch``)."""
