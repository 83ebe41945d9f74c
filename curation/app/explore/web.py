"""The ``curate explore`` web app: FastAPI routes over :class:`Explorer`, server-rendered pages.

Read-only: no route writes to the store (thumbnails and decisions computed from a policy go to
the cache folder). Pages are Jinja2 templates with autoescaping on, so member names, keys and
captions are always escaped. Samples are addressed by query parameters (dataset, shard, key);
one that does not exist gives a 404 page saying what is missing, and no route ever answers
with a traceback.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates

from curation.app.explore.data import PAGE, Explorer, QueryError
from curation.app.explore.fetch import SampleNotFound, ThumbCache, read_sample, video_frames

log = logging.getLogger(__name__)
_TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
_IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}


def _hist_svg(h: dict[str, Any], w: int = 360, ht: int = 90) -> dict[str, Any]:
    """Bar geometry of a histogram and x positions of its thresholds (for the template)."""
    bins = h["bins"]
    if not bins:
        return {"bars": [], "lines": [], "w": w, "h": ht, "lo": None, "hi": None}
    top, bw = max(bins) or 1, w / len(bins)
    bars = [{"x": round(i * bw, 1), "w": round(bw - 1, 1), "h": round(ht * n / top, 1), "n": n} for i, n in enumerate(bins)]
    span = (h["hi"] - h["lo"]) or 1.0
    lines = [{"x": round(min(max((v - h["lo"]) / span, 0), 1) * w, 1), "label": f"{name} = {v:g}"}
             for name, v in h["thresholds"]]
    return {"bars": bars, "lines": lines, "w": w, "h": ht, "lo": h["lo"], "hi": h["hi"]}


class _Ctx:
    """What every route needs: the explorer, the templates, the thumbnail cache, a thread pool."""

    def __init__(self, ex: Explorer) -> None:
        self.ex = ex
        self.templates = Jinja2Templates(directory=_TEMPLATES)
        self.thumbs = ThumbCache(os.path.join(ex.cache, "thumbs"))
        self.pool = ThreadPoolExecutor(8)

    def page(self, request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        return self.templates.TemplateResponse(request, name, {"ex": self.ex, **ctx}, status_code=status)

    def captions(self, cards: list[dict]) -> list[dict]:
        """Each card's caption (one ranged read of the sample, which also caches its thumbnail)."""
        def one(c: dict) -> dict:
            try:
                c["caption"] = self.thumbs.get(self.ex.locate(c["dataset"], c["shard"], c["key"]), self.ex.so)[1]
            except Exception as e:  # noqa: BLE001 - one unreadable sample shows its error, not a broken page
                c["caption"] = f"(unreadable: {e})"
            return c
        self.ex.locate_many(cards)
        return list(self.pool.map(one, cards))

    def grid(self, request: Request, title: str, cards: list[dict], total: int, col: str | None, page_no: int,
             sort: str, params: dict[str, str], path: str, where: str = "") -> HTMLResponse:
        return self.page(request, "grid.html", title=title, cards=self.captions(cards), total=total, col=col,
                         page_no=page_no, sort=sort, per=PAGE, params=params, path=path, where=where)


def create_app(ex: Explorer) -> FastAPI:
    app = FastAPI(title="curate explore", docs_url=None, redoc_url=None, openapi_url=None)
    ctx = _Ctx(ex)
    _add_handlers(app, ctx)
    _add_pages(app, ctx)
    _add_sample_routes(app, ctx)
    return app


def _add_handlers(app: FastAPI, ctx: _Ctx) -> None:
    @app.exception_handler(SampleNotFound)
    async def _not_found(request: Request, e: SampleNotFound) -> HTMLResponse:
        return ctx.page(request, "error.html", 404, title="not found", message=str(e))

    @app.exception_handler(QueryError)
    async def _bad_query(request: Request, e: QueryError) -> HTMLResponse:
        return ctx.page(request, "error.html", 400, title="refused", message=str(e))

    @app.exception_handler(Exception)
    async def _error(request: Request, e: Exception) -> HTMLResponse:
        log.exception("explore: %s", request.url)
        return ctx.page(request, "error.html", 500, title="error", message=f"{type(e).__name__}: {e}")


def _add_pages(app: FastAPI, ctx: _Ctx) -> None:
    ex = ctx.ex

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, col: str = "") -> HTMLResponse:
        cols = ex.numeric_columns()
        col = col if col in cols else next((c for c in ("clip_score", "caption_words") if c in cols), cols[0] if cols else "")
        rows = ex.overview()
        for r in rows:
            r["hist"] = _hist_svg(ex.histogram(r["dataset"], col)) if col else None
        return ctx.page(request, "overview.html", rows=rows, col=col, cols=cols)

    @app.get("/rule", response_class=HTMLResponse)
    def rule(request: Request, dataset: str, rule: str, page_no: int = 0, sort: str = "asc") -> HTMLResponse:
        cards, total, col = ex.rule_page(dataset, rule, page_no, sort == "desc")
        return ctx.grid(request, f"{dataset}: dropped by {rule}", cards, total, col, page_no, sort,
                        {"dataset": dataset, "rule": rule}, "/rule")

    @app.get("/query", response_class=HTMLResponse)
    def query(request: Request, where: str = "", page_no: int = 0, col: str = "", sort: str = "asc") -> HTMLResponse:
        cards, total = ex.query(where, page_no, col or None, sort == "desc") if where.strip() else ([], 0)
        return ctx.grid(request, "query", cards, total, col or None, page_no, sort, {"where": where, "col": col},
                        "/query", where=where)

    @app.get("/compare", response_class=HTMLResponse)
    def compare(request: Request, dataset: str, page_no: int = 0) -> HTMLResponse:
        cards, total = ex.compare_page(dataset, page_no)
        return ctx.grid(request, f"{dataset}: kept by the second policy, dropped by the first", cards, total, None,
                        page_no, "asc", {"dataset": dataset}, "/compare")

    @app.get("/score", response_class=HTMLResponse)
    def score(request: Request, dataset: str, col: str) -> HTMLResponse:
        rows = ex.deciles(dataset, col)
        for r in rows:
            r["samples"] = ctx.captions(r["samples"])
        return ctx.page(request, "score.html", dataset=dataset, col=col, rows=rows, cols=ex.numeric_columns())


def _add_sample_routes(app: FastAPI, ctx: _Ctx) -> None:
    ex = ctx.ex

    @app.get("/sample", response_class=HTMLResponse)
    def sample(request: Request, dataset: str, shard: str, key: str) -> HTMLResponse:
        scores = ex.scores(dataset, shard, key)
        loc = ex.locate(dataset, shard, key)
        s = read_sample(loc, ex.so)
        doc = []
        if s.kind == "interleaved":
            by_text: dict[int, list] = {}
            for info in s.image_info:
                by_text.setdefault(info.get("matched_text_index"), []).append(info)
            doc = [{"text": t, "images": by_text.get(i, [])} for i, t in enumerate(s.text_list)]
        return ctx.page(request, "sample.html", s=s, loc=loc, scores=scores, doc=doc,
                        members=sorted((k, len(v)) for k, v in s.members.items()),
                        frames=len(video_frames(getattr(s, "video", None))) if s.kind == "video" else 0)

    @app.get("/thumb")
    def thumb(dataset: str, shard: str, key: str) -> Response:
        data, _ = ctx.thumbs.get(ex.locate(dataset, shard, key), ex.so)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    @app.get("/media")
    def media(dataset: str, shard: str, key: str, member: str) -> Response:
        s = read_sample(ex.locate(dataset, shard, key), ex.so)
        data = s.members.get(member)
        if data is None:
            data = (getattr(s, "images", {}) or {}).get(member)
        if data is None:
            raise SampleNotFound(f"sample {dataset}/{shard}/{key} has no member or image {member!r}")
        kind = _IMAGE_TYPES.get(member.rsplit(".", 1)[-1].lower(), "text/plain; charset=utf-8")
        return Response(data, media_type=kind, headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/frame")
    def frame(dataset: str, shard: str, key: str, i: int) -> Response:
        frames = video_frames(getattr(read_sample(ex.locate(dataset, shard, key), ex.so), "video", None))
        if not 0 <= i < len(frames):
            raise SampleNotFound(f"sample {dataset}/{shard}/{key} has no frame {i}")
        return Response(frames[i], media_type="image/jpeg")
