"""A scoring plan: a recipe resolved once into shard tasks and scorer specs, with a content key.

Both the ``curate score`` command and the Prefect flows (``flows/tasks.py``) score through a
:class:`ScoringPlan`: the recipe is read, validated and checked (shards listed, scorers built)
once, in :meth:`ScoringPlan.resolve`; after that, nothing re-reads it by path.

:meth:`ScoringPlan.fingerprint` is the content key of scoring with some scorers: the recipe's
bytes, every input shard's version (size and mtime locally, the ETag on S3: metadata only, no
data read) and each scorer's config hash (which covers its weights' checksum). A new, changed or
removed shard, an edited recipe or retrained weights give a new key, which is what the flows'
cache keys on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from curation.data import storage
from curation.data.shards import shard_name
from curation.scoring.engine import ProgressFn, RunReport, ScorerSpec, ShardTask, run_pass, run_scoring, score_file_url
from curation.scoring.recipe import RecipeError, ScoreRecipe, check_recipe, load_score_recipe


@dataclass(frozen=True)
class ScoringPlan:
    source: str  # the recipe file, or "<mapping>"
    recipe: ScoreRecipe
    tasks: tuple[ShardTask, ...]
    specs: tuple[ScorerSpec, ...]
    recipe_sha256: str

    @classmethod
    def resolve(cls, recipe: str | dict[str, Any], base_dir: str | None = None) -> "ScoringPlan":
        """Load, validate and check a recipe (file or mapping): raises ``RecipeError`` naming the field."""
        parsed = load_score_recipe(recipe, base_dir)
        tasks, specs = check_recipe(parsed)
        if isinstance(recipe, str):
            with open(recipe, "rb") as f:
                raw = f.read()
        else:
            raw = json.dumps(recipe, sort_keys=True, default=str).encode()
        source = recipe if isinstance(recipe, str) else "<mapping>"
        return cls(source, parsed, tuple(tasks), tuple(specs), hashlib.sha256(raw).hexdigest())

    @property
    def work(self) -> str:
        return self.recipe.work

    @property
    def scorer_names(self) -> list[str]:
        return [s.name for s in self.specs]

    def spec(self, scorer: str) -> ScorerSpec:
        for s in self.specs:
            if s.name == scorer:
                return s
        raise RecipeError(f"scorer {scorer!r} is not in recipe {self.source} (it has {self.scorer_names})")

    def only(self, scorers: list[str]) -> "ScoringPlan":
        """The same plan with only these scorers (each must be in the recipe)."""
        return replace(self, specs=tuple(self.spec(n) for n in scorers))

    def fingerprint(self, *scorers: str) -> str:
        """The content key of scoring this plan's shards with ``scorers`` (module docstring)."""
        blob = {"recipe": self.recipe_sha256, "shards": [v for t in self.tasks for v in storage.versions(t.url)],
                "scorers": [self.spec(n).build().config_hash() for n in scorers], "work": self.work}
        return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()

    def score_files(self, scorer: str) -> list[str]:
        return [score_file_url(self.work, scorer, t.dataset, shard_name(t.url)) for t in self.tasks]

    def outputs_present(self, *scorers: str) -> bool:
        """Whether every score file that scoring with ``scorers`` writes exists (one listing each)."""
        for scorer in scorers:
            listed = storage.versions(storage.join(self.work, "scores", scorer))
            present = {u for u, v in listed if v != "missing"}
            if not all(storage.to_url(*storage.get_fs(u)) in present for u in self.score_files(scorer)):
                return False
        return True

    def passes(self) -> list[list[str]]:
        """The scorers grouped into fused passes: one per kind of device (and apart, those that read
        no media), in recipe order."""
        from curation.scoring.fused import needs_media
        from scorers import scorer_class

        groups: dict[tuple[str, bool], list[str]] = {}
        for s in self.specs:
            gpu = s.num_gpus > 0 or str(s.params.get("device", "cpu")).startswith("cuda")
            # scorers that decode nothing read only headers and text members: a pass of their own
            groups.setdefault(("gpu" if gpu else "cpu", needs_media([scorer_class(s.name)])), []).append(s.name)
        return list(groups.values())

    def run_pass(self, scorers: list[str], progress: ProgressFn | None = None) -> list[RunReport]:
        """Score every shard with these scorers in one fused pass on Ray (one read and one decode
        of each sample for all of them; resumable per scorer)."""
        return run_pass(list(self.tasks), [self.spec(n) for n in scorers], self.work, progress=progress,
                        ray_address=self.recipe.ray.address, num_cpus=self.recipe.ray.num_cpus)

    def run(self, scorer: str, progress: ProgressFn | None = None) -> RunReport:
        """Score every shard with one scorer on Ray (resumable: finished score files are skipped)."""
        return run_scoring(list(self.tasks), self.spec(scorer), self.work, progress=progress,
                           ray_address=self.recipe.ray.address, num_cpus=self.recipe.ray.num_cpus)
