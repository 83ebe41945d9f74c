"""Scorers: plain classes that turn a batch of samples into columns of scores.

``build_scorer("clip", model="...")`` makes one by registry name; see ``scorers.base.Scorer``.
Scorers import neither Ray nor Prefect.

The registry is the one place scorer names are looked up: the recipe validator, the driver and
every Ray worker ask it. It holds the built-in scorers and every scorer an installed package
declares under the ``vlm_curation.scorers`` entry point group (name = scorer name, value =
``"module:Class"``), e.g. in the plugin's ``pyproject.toml``::

    [project.entry-points."vlm_curation.scorers"]
    toxicity = "my_filters.toxicity:ToxicityScorer"

Entry points are read from the installed packages' metadata (``importlib.metadata``), so a
fresh process (a Ray worker) finds the same plugins as the driver, with no registration call.
"""

from __future__ import annotations

import logging
from typing import Any

from scorers.base import Prepared, Scorer

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vlm_curation.scorers"

BUILTIN: dict[str, str] = {
    "basic": "scorers.basic:BasicScorer",
    "clip": "scorers.clip:ClipScorer",
    "deltaloss": "scorers.deltaloss:DeltaLossScorer",
    "meta": "scorers.meta:MetaScorer",
    "text": "scorers.text:TextScorer",
}
_REGISTRY: dict[str, str] = {}  # register_scorer(): this process only


def register_scorer(name: str, target: str) -> None:
    """Register ``"module:Class"`` under ``name`` in this process only (a notebook, a test).
    Ray workers do not see it: a scorer that runs on Ray is declared as an entry point."""
    _REGISTRY[name] = target


def plugin_scorers() -> dict[str, str]:
    """Scorer name -> ``"module:Class"`` for every ``vlm_curation.scorers`` entry point of the
    installed packages (read each time: a package installed since is found). A plugin may not
    take a built-in's name: it is skipped with a warning."""
    from importlib.metadata import entry_points

    found: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in BUILTIN:
            log.warning("ignoring plugin scorer %r (%s): the name belongs to a built-in scorer", ep.name, ep.value)
            continue
        if ep.name in found and found[ep.name] != ep.value:
            log.warning("plugin scorer %r is declared twice (%s and %s); using the first", ep.name, found[ep.name],
                        ep.value)
            continue
        found[ep.name] = ep.value
    return found


def _registry() -> dict[str, str]:
    return {**plugin_scorers(), **_REGISTRY, **BUILTIN}


def scorer_names() -> list[str]:
    return sorted(_registry())


def scorer_class(name: str) -> type[Scorer]:
    import importlib

    registry = _registry()
    if name not in registry:
        raise KeyError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(registry))} (a plugin scorer is "
                       f"found once its package, declaring it under the {ENTRY_POINT_GROUP!r} entry points, is installed)")
    target = registry[name]
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ImportError(f"scorer {name!r} is declared as {target!r}, which cannot be imported: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Scorer)):
        raise TypeError(f"scorer {name!r} ({target}) is not a subclass of scorers.base.Scorer")
    if cls.name != name:  # score files are filed under the name: the two must agree
        raise TypeError(f"scorer {name!r} ({target}) calls itself {cls.name!r}; set its class attribute "
                        f"name = {name!r}")
    return cls


def build_scorer(name: str, **params: Any) -> Scorer:
    return scorer_class(name)(**params)


__all__ = ["ENTRY_POINT_GROUP", "Prepared", "Scorer", "build_scorer", "plugin_scorers", "register_scorer", "scorer_class",
           "scorer_names"]
