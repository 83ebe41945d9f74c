"""The code's floors, held by a test: nothing imports from a floor above its own, there are no
import cycles between modules, and the model and scorers never import Ray or Prefect (so they
run in a notebook, a Ray worker or a training job alike).

Floors, bottom up (README, "Where things are"): ``curation.common`` (shared helpers),
``curation.data`` (storage, tar records, readers, writer), ``model``, ``scorers``,
``curation.scoring`` and ``curation.corpus``, ``curation.selection``, ``training_hooks``,
``flows``, ``curation.app`` (the CLI). Imports inside functions count too.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLOORS = [["curation.common"], ["curation.data"], ["model"], ["scorers"], ["curation.scoring", "curation.corpus"],
          ["curation.selection"], ["training_hooks"], ["flows"], ["curation.app"]]
FLOOR = {pkg: i for i, pkgs in enumerate(FLOORS) for pkg in pkgs}
OURS = ("curation", "flows", "training_hooks", "scorers", "model")


def _package(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "curation" and len(parts) > 1 else parts[0]


def _modules():
    for top in OURS:
        for path in sorted((ROOT / top).rglob("*.py")):
            yield ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"), path


def _imports(path: pathlib.Path, top_level_only: bool = False):
    """(imported module, line) for every absolute import in the file."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, node.lineno
            for a in node.names:  # `from curation.data import storage` imports a module
                yield f"{node.module}.{a.name}", node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno


def test_every_module_is_on_a_floor():
    floors = {_package(m) for m, _ in _modules() if m not in OURS}
    assert floors <= set(FLOOR), f"packages with no floor: {sorted(floors - set(FLOOR))} (add them to FLOORS and the README map)"


def test_nothing_imports_from_a_floor_above():
    upward = []
    for module, path in _modules():
        here = FLOOR.get(_package(module))
        for target, line in _imports(path):
            there = FLOOR.get(_package(target)) if target.split(".")[0] in OURS else None
            if here is not None and there is not None and there > here:
                upward.append(f"{path.relative_to(ROOT)}:{line} ({_package(module)}) imports {target} ({_package(target)})")
    assert not upward, "\n".join(upward)


def test_no_import_cycles_between_modules():
    modules = dict(_modules())
    graph = {m: {t for t, _ in _imports(p, top_level_only=True) if t in modules and t != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(t):] + [t]) if t in trail else t)
            if t not in state:
                visit(t, trail + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("package", ["model", "scorers"])
def test_model_and_scorers_import_neither_ray_nor_prefect(package):
    found = [f"{path.relative_to(ROOT)}:{line} imports {target}" for module, path in _modules()
             if _package(module) == package for target, line in _imports(path)
             if target.split(".")[0] in ("ray", "prefect", "prefect_ray")]
    assert not found, "\n".join(found)
