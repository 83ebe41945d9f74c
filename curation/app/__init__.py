"""The ``curate`` command line (``cli``): commands grouped by what they work on, on one Typer app (``base``)."""
