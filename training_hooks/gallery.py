"""A small gallery of evaluated images: a PNG grid and a markdown page, generated vs true captions."""

from __future__ import annotations

import io
import math
import os
import textwrap
from typing import Any, Sequence


def truth_text(t: dict[str, Any]) -> str:
    return f"{t['color']} {t['shape']}, {t['pos']}, on {t['bg']}"


def _marks(judged: dict[str, bool | None] | None) -> str:
    if not judged:
        return ""
    sign = {True: "+", False: "-", None: "?"}
    return " ".join(f"{a}{sign[v]}" for a, v in judged.items())


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def write_gallery(rows: Sequence[dict[str, Any]], out_dir: str, report: dict[str, Any], cols: int = 4) -> dict[str, str]:
    """``gallery.png`` (images with the generated caption, green when every judged attribute is
    right, red otherwise, and the truth) and ``gallery.md`` (the grid and a table) in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    png, md = os.path.join(out_dir, "gallery.png"), os.path.join(out_dir, "gallery.md")
    n = max(1, len(rows))
    grid_rows = math.ceil(n / cols)
    fig, axes = plt.subplots(grid_rows, cols, figsize=(3.2 * cols, 3.6 * grid_rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i >= len(rows):
            continue
        r = rows[i]
        ax.imshow(Image.open(io.BytesIO(r["image"])).convert("RGB"))
        ok = r.get("judged") is None or all(v is not False for v in r["judged"].values())
        title = "\n".join(textwrap.wrap(r["generated"] or "(empty)", 34)[:3])
        if r.get("truth"):
            title += "\ntrue: " + truth_text(r["truth"])
        ax.set_title(title, fontsize=7, color="darkgreen" if ok else "firebrick")
    acc = report.get("caption_accuracy")
    fig.suptitle(f"caption accuracy {acc:.1%}" if acc is not None else "generated captions", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    per = report.get("per_attribute") or {}
    loss = report.get("heldout_loss") or {}
    lines = ["# Caption gallery", "",
             f"Checkpoint `{report.get('checkpoint', '')}`: caption accuracy "
             f"{_pct(acc)} over {report.get('images', len(rows))} images ("
             f"{', '.join(f'{a} {_pct(v)}' for a, v in per.items()) or 'no attribute judged'}), every attribute right on "
             f"{_pct(report.get('all_right'))}; a position stated in {_pct(report.get('position_stated'))} of captions; "
             f"held-out loss {', '.join(f'{k} {v:.3f}' for k, v in sorted(loss.items())) or 'n/a'}.", "",
             "", "![gallery](gallery.png)", "", "| key | generated | truth | judged |", "|---|---|---|---|"]
    for r in rows:
        gen = (r["generated"] or "").replace("|", "/")
        lines.append(f"| {r['key']} | {gen} | {truth_text(r['truth']) if r.get('truth') else '-'} | {_marks(r.get('judged'))} |")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return {"png": png, "markdown": md}
