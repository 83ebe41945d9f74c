"""``curate explore``: browse what every rule drops, in a local web page (read-only)."""

from __future__ import annotations

import hashlib
import os
from typing import Optional

import typer

from curation.app.base import app, console, fail


def default_cache(work: str) -> str:
    """Thumbnails and computed decisions live here, outside the store."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "curate-explore", hashlib.sha256(work.encode()).hexdigest()[:16])


@app.command()
def explore(
    work: str = typer.Option(..., "--work", help="Score store root (local folder or s3://)"),
    policy: Optional[str] = typer.Option(None, "--policy", "-p", help="Selection policy (YAML): reuses the decisions `curate select` made from these score files, else selects into the cache"),
    decisions: Optional[str] = typer.Option(None, "--decisions", help="A decisions.parquet written by `curate select`"),
    compare: Optional[str] = typer.Option(None, "--compare", help="A second policy (YAML) or decisions file: what it keeps that the first drops"),
    manifest: Optional[str] = typer.Option(None, "--manifest", help="A curated manifest.json: its stage mixture; its policy and decisions unless --policy/--decisions"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback by default)"),
    port: int = typer.Option(8765, "--port"),
    cache: Optional[str] = typer.Option(None, "--cache", help="Cache folder for thumbnails (default: under ~/.cache)"),
) -> None:
    """A read-only web page over the scores: what each rule drops, score deciles, samples, a query box."""
    import uvicorn

    from curation.app.explore.data import Explorer
    from curation.app.explore.web import create_app
    from curation.selection.policy import PolicyError

    if policy and decisions:
        fail("give --policy or --decisions, not both")
    cache = cache or default_cache(work)
    os.makedirs(cache, exist_ok=True)
    try:
        ex = Explorer(work, policy, decisions, manifest, cache, compare=compare)
    except (PolicyError, OSError, ValueError) as e:
        fail(str(e))
    if not ex.store.views:
        fail(f"no score files under {ex.store.root}; run `curate score` first")
    if ex.reused:
        console.print(f"decisions reused (same policy and score files): {ex.reused}")
    console.print(f"curate explore: http://{host}:{port}/  (cache {cache})")
    uvicorn.run(create_app(ex), host=host, port=port, log_level="warning")
