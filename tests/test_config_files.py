"""Every YAML file a user writes (scoring recipe, selection policy, training recipe) is read by one
loader: a missing file, broken YAML, an empty file or a bad field gets the same kind of message,
naming the file and the field, in the error type each command already reports."""

import pytest

from curation.scoring.recipe import RecipeError, load_score_recipe
from curation.selection.policy import PolicyError, load_policy
from training_hooks.recipe import TrainRecipeError, load_train_recipe

LOADERS = [
    ("scoring recipe", load_score_recipe, RecipeError, "work: w\nsources: [{shards: x}]\nscorers: [{name: basic, batch_size: -1}]\n",
     r"scorers\[0\]\.batch_size: "),
    ("policy", load_policy, PolicyError, "datasets:\n  web:\n    - {rule: valid}\n    - {rule: top_k, column: c, k: 0}\n",
     r"datasets\.web\[1\]\.k: "),
    ("training recipe", load_train_recipe, TrainRecipeError, "init: m\noutput: o\nstages: {warmup: {}}\n", r"stages: .*unknown stage"),
]


@pytest.mark.parametrize("what,load,error,bad_field,where", LOADERS, ids=[x[0] for x in LOADERS])
def test_one_message_format_for_every_config_file(tmp_path, what, load, error, bad_field, where):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(error, match=rf"^{what} not found: {missing}$"):
        load(str(missing))
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(error, match=rf"^{what} {broken} is not valid YAML: "):
        load(str(broken))
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing yet\n")
    with pytest.raises(error, match=rf"^{what} {empty} is empty: give it "):
        load(str(empty))
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(error, match=rf"^{what} {listed} must be a mapping.*\(got list\)$"):
        load(str(listed))
    bad = tmp_path / "bad.yaml"
    bad.write_text(bad_field)
    with pytest.raises(error, match=rf"^invalid {what} {bad}: {where}"):
        load(str(bad))
