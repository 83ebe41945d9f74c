"""Plugin scorers: a package installed with pip declares a scorer under the ``vlm_curation.scorers``
entry points, and the registry, the recipe validator, the driver and every Ray worker find it.

The plugin is a real package built and installed by pip (``--target`` a temporary folder, so the
shared environment is left as it was); the folder is put on ``PYTHONPATH`` of a ``curate score``
process, exactly as an installed package is on the path of a user's process and its Ray workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLUGIN_MODULE = '''
import os
import pyarrow as pa
from scorers.base import Scorer


class CaptionVowels(Scorer):
    """Share of vowels in the caption, and the pid of the process that scored it."""

    name = "vowels"
    version = "3"

    def __init__(self, letters: str = "aeiou") -> None:
        self.letters = letters

    def config(self):
        return {"letters": self.letters}

    def schema(self):
        return pa.schema([("share", pa.float32()), ("pid", pa.int64())])

    def compute(self, prepared):
        shares = []
        for s in prepared.samples:
            text = (getattr(s, "caption", None) or "").lower()
            shares.append(sum(c in self.letters for c in text) / len(text) if text else None)
        return {"share": shares, "pid": [os.getpid()] * len(shares)}
'''


@pytest.fixture(scope="module")
def plugin_path(tmp_path_factory):
    """pip-installs a tiny plugin package into a temporary folder; returns the folder."""
    src = tmp_path_factory.mktemp("plugin_src")
    (src / "vowel_plugin").mkdir()
    (src / "vowel_plugin" / "__init__.py").write_text(PLUGIN_MODULE)
    (src / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "vowel-plugin"
        version = "0.1.0"

        [project.entry-points."vlm_curation.scorers"]
        vowels = "vowel_plugin:CaptionVowels"

        [tool.setuptools]
        packages = ["vowel_plugin"]
    '''))
    target = tmp_path_factory.mktemp("plugin_site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--target", str(target), str(src)], check=True)
    return str(target)


def _env(extra_path: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, extra_path, env.get("PYTHONPATH", "")) if p)
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def test_registry_finds_an_installed_plugin(plugin_path):
    """In a fresh process with the package on its path: listed, validated, built, refused when absent."""
    probe = textwrap.dedent('''
        import json, scorers
        from curation.scoring.recipe import ScorerConfig
        ScorerConfig(name="vowels")  # the recipe validator accepts the name
        s = scorers.build_scorer("vowels", letters="ae")
        print(json.dumps({"names": scorers.scorer_names(), "identity": s.identity(), "hash": s.config_hash()}))
    ''')
    out = subprocess.run([sys.executable, "-c", probe], env=_env(plugin_path), capture_output=True, text=True,
                         check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "vowels" in got["names"] and {"basic", "clip", "meta", "text"} <= set(got["names"])
    assert got["identity"]["name"] == "vowels" and got["identity"]["config"] == {"letters": "ae"}
    absent = subprocess.run([sys.executable, "-c", "from curation.scoring.recipe import ScorerConfig; "
                             "ScorerConfig(name='vowels')"], env=_env(""), capture_output=True, text=True)
    assert absent.returncode != 0 and "unknown scorer 'vowels'" in absent.stderr


def test_plugin_scores_on_ray_with_its_identity_in_the_files(plugin_path, tmp_path):
    """``curate score`` with a recipe naming the plugin: Ray workers (other processes than the
    driver) import it from the entry point, and each score file records its identity and hash."""
    from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize

    corpus = tmp_path / "corpus"
    synthesize(str(corpus), SynthConfig(seed=3, datasets=[DatasetSpec("pairs", "pair", 12, {}, 4)]))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(textwrap.dedent(f'''
        work: {tmp_path / "work"}
        ray: {{num_cpus: 2}}
        sources: [{{shards: {corpus / "pairs"}, kind: pair}}]
        scorers: [{{name: vowels, params: {{letters: aeiou}}, workers: 2, batch_size: 4}}]
    '''))
    run = subprocess.run([sys.executable, "-m", "curation.app.cli", "score", "-c", str(recipe), "--json"],
                         env=_env(plugin_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    files = sorted((tmp_path / "work" / "scores" / "vowels").rglob("*.parquet"))
    files = [f for f in files if not f.name.startswith("_")]  # not the store catalog
    assert len(files) == 3
    table = pa.concat_tables([pq.ParquetFile(f).read() for f in files])
    assert table.num_rows == 12 and table.column("error").null_count == 12
    shares = table.column("share").to_pylist()
    assert all(0 < s < 1 for s in shares)
    assert os.getpid() not in table.column("pid").to_pylist()  # scored in the workers
    md = {k.decode(): v.decode() for k, v in pq.read_metadata(files[0]).metadata.items()}
    identity = json.loads(md["curation.identity"])
    assert md["curation.scorer"] == "vowels" and identity["version"] == "3" and identity["config"] == {"letters": "aeiou"}
    assert len(md["curation.config_hash"]) == 16
