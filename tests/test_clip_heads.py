"""CLIP heads (``scorers/clip_heads.py``): tiny heads with random weights, saved in the layouts the
published ones use (the LAION aesthetic predictor's ``nn.Sequential`` state dict as a ``.pth``, a
linear probe as safetensors, a two-class MLP with input standardization as a ``.pt``), named in a
recipe by relative path, add their columns to the clip score table in the pass that also runs
``text``: one decode per image, and values equal to the saved modules' own forward pass on the
stored embeddings. Bad heads fail when the recipe is checked, with a message naming the head."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.common.counters import count_decodes
from curation.corpus.synth import DatasetSpec, SynthConfig, synthesize
from curation.scoring.engine import score_file_url, score_local_pass
from curation.scoring.recipe import RecipeError, check_recipe, load_score_recipe

DIM = 64  # tiny-clip's embedding width


def _aesthetic(dim: int):
    """The LAION improved aesthetic predictor's architecture (its dropouts give the state dict's indices)."""
    import torch

    nn = torch.nn
    return nn.Sequential(nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)).eval()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import open_clip
    import torch
    from safetensors.torch import save_file

    from scorers.clip import register_configs, save_open_clip_dir

    root = tmp_path_factory.mktemp("heads")
    synthesize(str(root / "corpus"), SynthConfig(seed=3, datasets=[DatasetSpec("pairs", "pair", 12, {"corrupt_image": 0.1}, 12)]))
    register_configs()
    torch.manual_seed(0)
    save_open_clip_dir(open_clip.create_model("tiny-clip"), open_clip.get_model_config("tiny-clip"), str(root / "clip"),
                       {"size": 64})
    os.makedirs(root / "models")
    aesthetic = _aesthetic(DIM)
    torch.save(aesthetic.state_dict(), root / "models" / "aesthetic.pth")
    probe = {"weight": torch.randn(1, DIM), "bias": torch.randn(1)}
    save_file(probe, str(root / "models" / "nsfw.safetensors"))
    mlp = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    standardize = {"input_mean": torch.randn(DIM) * 0.01, "input_std": torch.rand(DIM) + 0.5}
    torch.save({**{f"net.{k}": v for k, v in mlp.state_dict().items()}, **standardize}, root / "models" / "wm.pt")
    return root, {"aesthetic": aesthetic, "probe": probe, "mlp": mlp, **standardize}


def _recipe(root, heads: list[dict]) -> dict:
    return {"work": "work", "sources": [{"shards": "corpus/pairs", "kind": "pair"}],
            "scorers": [{"name": "clip", "params": {"model": "./clip", "keep_embedding": True, "heads": heads}, "batch_size": 8},
                        {"name": "text", "batch_size": 8}]}


HEADS = [{"name": "aesthetic", "path": "models/aesthetic.pth", "format": "laion_aesthetic"},
         {"name": "nsfw", "path": "models/nsfw.safetensors", "format": "linear", "output": "sigmoid", "reduce": "max"},
         {"name": "watermark", "path": "models/wm.pt", "format": "mlp", "activation": "relu", "output": "softmax",
          "index": 1}]


def test_heads_add_columns_in_the_clip_and_text_pass(setup):
    import torch

    root, mods = setup
    recipe = load_score_recipe(_recipe(root, HEADS), base_dir=str(root))  # head paths resolve against the recipe
    tasks, specs = check_recipe(recipe)
    with count_decodes() as decodes:
        reports = score_local_pass(tasks, specs, recipe.work)
    assert all(not r.failed for r in reports)
    url = tasks[0].url
    clip = pq.read_table(score_file_url(recipe.work, "clip", "pairs", os.path.basename(url)[:-4])).to_pylist()
    text = pq.read_table(score_file_url(recipe.work, "text", "pairs", os.path.basename(url)[:-4])).to_pylist()
    assert len(clip) == len(text) == 12 and decodes.n <= 12  # one pass, at most one decode per image
    assert all(r["lang"] is not None for r in text if r["error"] is None)
    scored = [r for r in clip if r["error"] is None]
    assert scored and any(r["error"] for r in clip)  # the corrupt images: error, null head values
    assert all(r["aesthetic"] is None and r["nsfw"] is None for r in clip if r["error"])
    emb = torch.tensor(np.array([r["clip_image_emb"] for r in scored], dtype=np.float32))
    with torch.inference_mode():  # the saved modules' own forward passes on the stored embeddings
        aesthetic = mods["aesthetic"](emb)[:, 0].numpy()
        nsfw = torch.sigmoid(emb @ mods["probe"]["weight"].T + mods["probe"]["bias"])[:, 0].numpy()
        wm = torch.softmax(mods["mlp"]((emb - mods["input_mean"]) / mods["input_std"]), dim=-1)[:, 1].numpy()
    for col, want in (("aesthetic", aesthetic), ("nsfw", nsfw), ("watermark", wm)):
        got = np.array([r[col] for r in scored])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=col)
    assert np.ptp(aesthetic) > 0  # the heads see each image's own embedding


@pytest.mark.parametrize("head, message", [
    ({"name": "aesthetic", "path": "models/big.pth", "format": "laion_aesthetic"}, "takes 768-d embeddings"),
    ({"name": "aesthetic", "path": "models/wm.pt", "format": "laion_aesthetic"}, "not in the laion_aesthetic layout"),
    ({"name": "nsfw", "path": "models/nsfw.h5", "format": "mlp"}, "Keras"),
    ({"name": "nsfw", "path": "models/module.pt", "format": "linear"}, "cannot read"),
    ({"name": "wm", "path": "models/wm.pt", "format": "mlp", "activation": "relu"}, "use output: softmax"),
    ({"name": "clip_x", "path": "models/nsfw.safetensors", "format": "linear"}, "not starting with 'clip_'"),
    ({"name": "nsfw", "path": "models/missing.pth", "format": "linear"}, "weights file not found"),
])
def test_bad_heads_fail_the_recipe_check_naming_the_head(setup, head, message):
    import torch

    root, _ = setup
    if not (root / "models" / "big.pth").exists():
        torch.save(_aesthetic(768).state_dict(), root / "models" / "big.pth")
        (root / "models" / "nsfw.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
        torch.save(torch.nn.Linear(DIM, 1), root / "models" / "module.pt")  # a pickled module, not a state dict
    recipe = load_score_recipe(_recipe(root, [head]), base_dir=str(root))
    with pytest.raises(RecipeError) as e:
        check_recipe(recipe)
    assert message in str(e.value) and repr(head["name"]) in str(e.value)
    if "768" in message:
        assert "gives 64-d" in str(e.value)


def test_h14_nsfw_layout_loads_and_matches_its_module(tmp_path):
    """clip-retrieval's H/14 NSFW MLP layout (ReLU + dropout after the first five linears), from a .pth."""
    import torch

    from scorers.clip_heads import load_head

    nn = torch.nn
    dims = [DIM, 1024, 2048, 1024, 256, 128, 16, 1]
    mods = []
    for j in range(7):
        mods.append(nn.Linear(dims[j], dims[j + 1]))
        if j < 5:
            mods += [nn.ReLU(), nn.Dropout(0.2)]
    net = nn.Sequential(*mods).eval()
    torch.save(net.state_dict(), tmp_path / "h14_nsfw.pth")
    head = load_head({"name": "nsfw", "path": str(tmp_path / "h14_nsfw.pth"), "format": "laion_nsfw_h14"})
    emb = torch.nn.functional.normalize(torch.randn(5, DIM), dim=-1)
    with torch.inference_mode():
        np.testing.assert_allclose(head(emb).numpy(), net(emb)[:, 0].numpy(), rtol=1e-4, atol=1e-6)
