"""What every ``curate`` command shares: the Typer app, the consoles, failing with a message, progress bars.

Commands live in ``curation/app/commands_*.py`` by what they work on (data, scoring, selection,
training); ``curation/app/cli.py`` puts them together.
"""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(
    help="Curate and prune vision-language training data: synthesize, read, score, select, reshard, train.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console(stderr=True, soft_wrap=True)
out_console = Console(soft_wrap=True)


def fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {escape(msg)}")
    raise typer.Exit(code)


def fail_if_disk_full(e: BaseException) -> None:
    """A full disk (ENOSPC, EDQUOT, EFBIG) as one line naming the file, not a traceback; other errors go on."""
    from curation.data.diskfull import NoSpaceError, is_disk_full

    if is_disk_full(e):
        fail(str(e) if isinstance(e, NoSpaceError) else f"no space left: {e}")


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console, transient=False,
    )
