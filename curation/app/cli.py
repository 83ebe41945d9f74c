"""The ``curate`` command line: every command, registered on one Typer app in the order ``--help`` lists them.

Each group of commands lives in its own module (``commands_data``, ``commands_scoring``,
``commands_selection``, ``commands_training``); shared pieces are in ``curation/app/base.py``.
"""

from __future__ import annotations

import sys

from curation.app import commands_data, commands_scoring, commands_selection, commands_training  # noqa: F401 - register
from curation.app import commands_explore  # noqa: F401 - register
from curation.app.base import app, console, out_console  # noqa: F401 - the public entry points
from curation.app.commands_scoring import score_summary_line  # noqa: F401


def main() -> None:  # pragma: no cover - console entry for `python -m curation.app.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
