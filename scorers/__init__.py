"""Scorers: plain classes that turn a batch of samples into columns of scores.

``build_scorer("clip", model="...")`` makes one by registry name; see ``scorers.base.Scorer``.
Scorers import neither Ray nor Prefect.
"""

from __future__ import annotations

from typing import Any

from scorers.base import Scorer

_REGISTRY: dict[str, str] = {
    "basic": "scorers.basic:BasicScorer",
    "clip": "scorers.clip:ClipScorer",
    "deltaloss": "scorers.deltaloss:DeltaLossScorer",
}


def register_scorer(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` (for scorers living outside this package)."""
    _REGISTRY[name] = target


def scorer_names() -> list[str]:
    return sorted(_REGISTRY)


def scorer_class(name: str) -> type[Scorer]:
    import importlib

    if name not in _REGISTRY:
        raise KeyError(f"unknown scorer {name!r}; known scorers: {', '.join(scorer_names())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_scorer(name: str, **params: Any) -> Scorer:
    return scorer_class(name)(**params)
