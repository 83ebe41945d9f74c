"""One loader for every YAML file a user writes: scoring recipes, selection policies, training recipes.

:func:`load_yaml_model` reads a file (or takes an already parsed mapping), validates it with a
pydantic model and, on any problem, raises the caller's error type with one message format:

- ``<what> not found: <path>``
- ``<what> <path> is not valid YAML: <parser message>``
- ``<what> <path> is empty: <hint>`` / ``<what> <path> must be a mapping ...``
- ``invalid <what> <path>: <field>: <problem>; <field>: <problem>`` where a field is written
  ``sources[0].shards`` (list positions in brackets, pydantic's union tags left out).
"""

from __future__ import annotations

import os
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def field_path(loc: Iterable[Any], hidden: Iterable[str] = ()) -> str:
    """``("sources", 0, "shards")`` -> ``sources[0].shards``; names in ``hidden`` (union tags) left out."""
    hide = set(hidden)
    out = ""
    for p in loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p not in hide:
            out += f".{p}" if out else str(p)
    return out or "(top level)"


def describe(e: ValidationError, hidden: Iterable[str] = ()) -> str:
    hidden = tuple(hidden)
    return "; ".join(f"{field_path(err['loc'], hidden)}: {err['msg'].removeprefix('Value error, ')}" for err in e.errors())


def read_yaml(path: str, what: str, error: type[Exception]) -> Any:
    if not os.path.exists(path):
        raise error(f"{what} not found: {path}")
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise error(f"{what} {path} is not valid YAML: {e}") from None


def load_yaml_model(source: str | dict[str, Any], model: type[M], *, what: str, error: type[Exception] = ValueError,
                    empty_hint: str = "", hidden: Iterable[str] = (), base_dir: str | None = None) -> tuple[M, str]:
    """Validate ``source`` (a YAML file path or a mapping) as ``model``. Returns the model and the
    folder that relative paths in it are relative to (the file's folder, else ``base_dir`` or the
    working directory)."""
    if isinstance(source, str):
        data, name = read_yaml(source, what, error), f"{what} {source}"
        base = base_dir or os.path.dirname(os.path.abspath(source))
    else:
        data, name, base = source, what, base_dir or os.getcwd()
    if data is None or data == {}:
        raise error(f"{name} is empty" + (f": {empty_hint}" if empty_hint else ""))
    if not isinstance(data, dict):
        raise error(f"{name} must be a mapping" + (f": {empty_hint}" if empty_hint else "")
                    + f" (got {type(data).__name__})")
    try:
        return model.model_validate(data), base
    except ValidationError as e:
        raise error(f"invalid {name}: {describe(e, hidden)}") from None
