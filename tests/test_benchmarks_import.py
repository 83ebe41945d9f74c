"""The README's benchmark commands must at least start: every benchmark module imports (a moved
name breaks a benchmark long before anyone runs it: the pruning benchmark once imported names the
corpus package no longer exported), and every script parses --help."""

import importlib
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts) for p in (ROOT / "benchmarks").rglob("*.py")
                 if p.name != "__init__.py")


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    importlib.import_module(name)


def test_pruning_benchmark_help():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pruning_quality.py"), "--help"], capture_output=True,
                       text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--seeds" in r.stdout and "--json" in r.stdout
