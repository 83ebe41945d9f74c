"""The bundled NVILA: token counts, splicing, labels, save/load, generation, FP8 emulation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from model import NVILAConfig, NVILAForCausalLM
from model.config import ConfigError
from model.conversation import SequenceTooLong, build_chat, build_pretrain_text, collate
from model.fp8 import FP8UnsupportedError, convert_to_fp8, fp8_hardware, sqnr
from model.image_processing import image_token_count, plan_image, video_token_count
from model.nvila import IGNORE_INDEX
from model.tokenizer import train_bpe_tokenizer
from curation.corpus.synth import Scene, encode_image, encode_mp4, render_clip, render_scene

CAPTIONS = [f"a {c} {s} on a {b} background" for c in ("red", "green", "blue") for s in ("circle", "square") for b in ("white", "black")]


@pytest.fixture(scope="module")
def tok():
    return train_bpe_tokenizer(CAPTIONS * 5 + ["Describe the image.", "What happens in the video?"], vocab_size=320)


def tiny_config(tok_len: int, **kw) -> NVILAConfig:
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    lc = dict(vocab_size=tok_len, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True)
    base = dict(vision_config=vc, llm_config=lc, s2_scales=[32, 64, 96], max_tiles=12, video_num_frames=4, video_pool_size=2)
    base.update(kw)
    return NVILAConfig(**base)


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    m = NVILAForCausalLM(tiny_config(len(tok)))
    m.attach_tokenizer(tok)
    return m


def _img(w=64, h=48, seed=0) -> bytes:
    return encode_image(render_scene(Scene("circle", "red", "blue", "center"), w, h, np.random.default_rng(seed)), "png")


def _chat(model, tok, img_bytes=None, answer="a red circle on a blue background"):
    media = [model.preprocess_image(img_bytes or _img())]
    return build_chat(tok, [{"role": "user", "content": "<image>\nDescribe the image."},
                            {"role": "assistant", "content": answer}], media)


# (width, height, mode, projector) -> (tiles, LLM tokens), for NVILA's real sizes (448 px SigLIP tiles,
# patch 14 -> 32x32 patches, S2 scales 448/896/1344, at most 12 tiles). Derived by hand from the rules:
# - dynamic_s2 (VILA): scales 448 and 896 give 1 + 4 square tiles; the last scale's (cols, rows) grid is
#   one of the 9..12-tile grids, cols/rows in {1/12, 1/11, 1/10, 1/9, 1/3 (2x6), 2/5, 3/4, 1 (3x3), 4/3,
#   5/2, 3 (6x2), 9, 10, 11, 12}, the closest to w/h by absolute difference; on an exact tie the grid
#   with more tiles wins when w*h > 0.5 * 448^2 * tiles. Each last-scale tile gives 16x16 = 256 tokens
#   (2x2 projector) or 11x11 = 121 (3x3: 32 padded to 33).
# - dynamic (NVILA-Lite): closest tiling of 1..12 tiles + a thumbnail when > 1, 256 tokens per tile.
# This table is documented in the README.
TOKEN_TABLE = [
    (448, 448, "resize", "mlp_downsample_2x2", 1, 256),
    (448, 448, "resize", "mlp_downsample_3x3", 1, 121),
    (1000, 300, "resize", "mlp_downsample_2x2", 1, 256),
    # square: 3x3 at any size, also for a tiny image (VILA blows small images up to 9 tiles)
    (448, 448, "dynamic_s2", "mlp_downsample_2x2", 5 + 9, 9 * 256),
    (1344, 1344, "dynamic_s2", "mlp_downsample_2x2", 5 + 9, 9 * 256),
    (1344, 1344, "dynamic_s2", "mlp_downsample_3x3", 5 + 9, 9 * 121),
    (20, 20, "dynamic_s2", "mlp_downsample_2x2", 5 + 9, 9 * 256),
    # tiny 16:9 (1.78): 4/3 is 0.44 away, 5/2 0.72 -> 4 cols x 3 rows
    (16, 9, "dynamic_s2", "mlp_downsample_2x2", 5 + 12, 12 * 256),
    # wide 2:1: 5/2 (0.5 away) beats 4/3 (0.67) -> 5 cols x 2 rows; tall 1:2: 2/5 (0.1) beats 3/4 -> 2 x 5
    (1792, 896, "dynamic_s2", "mlp_downsample_2x2", 5 + 10, 10 * 256),
    (896, 1792, "dynamic_s2", "mlp_downsample_2x2", 5 + 10, 10 * 256),
    # 10:3 (3.33): 6x2 (ratio 3) is closest; 1:3 is exactly 2 cols x 6 rows
    (1000, 300, "dynamic_s2", "mlp_downsample_2x2", 5 + 12, 12 * 256),
    (300, 900, "dynamic_s2", "mlp_downsample_2x2", 5 + 12, 12 * 256),
    # extreme: 20:1 -> 12x1, 1:20 -> 1x12
    (2000, 100, "dynamic_s2", "mlp_downsample_2x2", 5 + 12, 12 * 256),
    (100, 2000, "dynamic_s2", "mlp_downsample_2x2", 5 + 12, 12 * 256),
    # exact ties: 9.5 sits 0.5 from 9x1 and 10x1; 2.75 sits 0.25 from 5x2 and 6x2. The larger grid only
    # when the image has more than half its canvas: 1900*200 < 0.5*448^2*10 < 3800*400, and
    # 1100*400 < 0.5*448^2*12 < 2200*800
    (1900, 200, "dynamic_s2", "mlp_downsample_2x2", 5 + 9, 9 * 256),
    (3800, 400, "dynamic_s2", "mlp_downsample_2x2", 5 + 10, 10 * 256),
    (1100, 400, "dynamic_s2", "mlp_downsample_2x2", 5 + 10, 10 * 256),
    (2200, 800, "dynamic_s2", "mlp_downsample_2x2", 5 + 12, 12 * 256),
    # the absolute difference is not symmetric in w/h: 4:11 (0.364) is 0.030 from 1/3 and 0.036 from 2/5
    (400, 1100, "dynamic_s2", "mlp_downsample_2x2", 5 + 12, 12 * 256),
    (896, 896, "dynamic", "mlp_downsample_2x2", 5, 1280),
    (448, 448, "dynamic", "mlp_downsample_2x2", 1, 256),
    (2000, 400, "dynamic", "mlp_downsample_2x2", 6, 6 * 256),
]
# the last scale's (rows, cols) for the dynamic_s2 rows above, in order
S2_LAST_GRIDS = [(3, 3), (3, 3), (3, 3), (3, 3), (3, 4), (2, 5), (5, 2), (2, 6), (6, 2), (1, 12), (12, 1),
                 (1, 9), (1, 10), (2, 5), (2, 6), (6, 2)]


@pytest.mark.parametrize("w,h,mode,proj,tiles,expected", TOKEN_TABLE)
def test_token_count_table(w, h, mode, proj, tiles, expected):
    assert image_token_count(w, h, mode=mode, tile=448, patch=14, scales=[448, 896, 1344], max_tiles=12, projector=proj) == expected
    assert plan_image(w, h, mode, 448, [448, 896, 1344], 12).num_tiles == tiles


def test_dynamic_s2_last_grids_follow_vila():
    rows = [(w, h) for w, h, mode, *_ in TOKEN_TABLE if mode == "dynamic_s2"]
    got = [plan_image(w, h, "dynamic_s2", 448, [448, 896, 1344], 12).grids for w, h in rows]
    assert all(g[:2] == [(1, 1), (2, 2)] for g in got)  # every scale but the last: a square grid
    assert [g[-1] for g in got] == S2_LAST_GRIDS


def test_dynamic_s2_refuses_too_few_tiles():
    with pytest.raises(ConfigError, match="max_tiles 6 is below the 9 tiles"):
        tiny_config(320, max_tiles=6)
    with pytest.raises(ConfigError, match="first s2 scale must be the tile size 32"):
        tiny_config(320, s2_scales=[64, 96])


def test_video_token_count():
    assert video_token_count(8, 8, tile=448, patch=14, projector="mlp_downsample_2x2") == 257
    assert video_token_count(32, 8, tile=448, patch=14, projector="mlp_downsample_3x3") == 4 * 122


@pytest.mark.parametrize("mode", ["dynamic_s2", "dynamic", "resize"])
@pytest.mark.parametrize("proj", ["mlp_downsample_2x2", "mlp_downsample_3x3", "linear"])
@pytest.mark.parametrize("size", [(64, 48), (96, 32), (20, 90)])
def test_spliced_length_matches_token_count(tok, mode, proj, size):
    m = NVILAForCausalLM(tiny_config(len(tok), image_mode=mode, projector_type=proj))
    m.attach_tokenizer(tok)
    media = m.preprocess_image(_img(*size))
    emb = m.encode_media([media])[0]
    c = m.config
    assert emb.shape == (image_token_count(*size, mode=mode, tile=32, patch=8, scales=c.s2_scales,
                                           max_tiles=c.max_tiles, projector=proj), 64)


def test_forward_backward_and_labels_only_on_answers(model, tok):
    ex = _chat(model, tok)
    labeled = [t for t, l in zip(ex.input_ids, ex.labels) if l != IGNORE_INDEX]
    assert tok.decode(labeled) == "a red circle on a blue background<|im_end|>"
    batch = collate([ex, _chat(model, tok, _img(90, 40, 1), "a blue square")], tok.pad_token_id)
    embeds, mask, labels = model.build_inputs(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["media"])
    n_media = [m.encode_media(x)[0].shape[0] for m, x in ((model, batch["media"][0]), (model, batch["media"][1]))]
    for i in range(2):
        # media positions and padding are ignored; answer tokens keep their ids
        n_text = int(batch["attention_mask"][i].sum()) - 1
        assert int(mask[i].sum()) == n_text + n_media[i]
        assert int((labels[i] != IGNORE_INDEX).sum()) == sum(l != IGNORE_INDEX for l in batch["labels"][i].tolist())
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for name, part in model.module_groups().items():
        grads = [p.grad for p in part.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_pretrain_text_labels_every_text_token(model, tok):
    media = [model.preprocess_image(_img())]
    ex = build_pretrain_text(tok, "A drawing. <image> a red circle on a blue background.", media)
    media_id = tok.convert_tokens_to_ids("<image>")
    assert [l for t, l in zip(ex.input_ids, ex.labels) if t == media_id] == [IGNORE_INDEX]
    assert sum(l != IGNORE_INDEX for l in ex.labels) == len(ex.input_ids) - 1


def test_video_frames_pooled_with_separators(model, tok):
    clip = encode_mp4(render_clip(Scene("square", "red", "black", "center"), "from left to right", 32, 8,
                                  np.random.default_rng(0)), 8)
    media = model.preprocess_video(clip)
    assert media.tiles.shape == (4, 3, 32, 32)
    emb = model.encode_media([media])[0]
    assert emb.shape[0] == video_token_count(4, 2, tile=32, patch=8, projector="mlp_downsample_2x2") == 2 * (4 + 1)
    sep = model.llm.get_input_embeddings().weight[model.config.sep_token_id]
    assert torch.equal(emb[4], sep) and torch.equal(emb[9], sep)
    ex = build_chat(tok, [{"role": "user", "content": "<vila/video>\nWhat happens in the video?"},
                          {"role": "assistant", "content": "a red square moves"}], [media])
    out = model(**collate([ex], tok.pad_token_id))
    assert torch.isfinite(out.loss)


def test_save_load_identical_logits(model, tok, tmp_path):
    batch = collate([_chat(model, tok)], tok.pad_token_id)
    model.eval()
    with torch.no_grad():
        ref = model(**batch).logits
    model.save_pretrained(str(tmp_path / "ckpt"), tok)
    loaded = NVILAForCausalLM.from_pretrained(str(tmp_path / "ckpt")).eval()
    from model.nvila import load_tokenizer

    tok2 = load_tokenizer(str(tmp_path / "ckpt"))
    assert tok2.convert_tokens_to_ids("<image>") == loaded.config.image_token_id
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.equal(ref, got)


def test_build_from_separate_siglip_and_qwen2_dirs(tok, tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    cfg = tiny_config(len(tok))
    SiglipVisionModel(SiglipVisionConfig(**cfg.vision_config)).save_pretrained(tmp_path / "siglip")
    Qwen2ForCausalLM(Qwen2Config(**cfg.llm_config)).save_pretrained(tmp_path / "qwen2")
    tok.save_pretrained(tmp_path / "qwen2")
    model, tok2 = NVILAForCausalLM.from_components(str(tmp_path / "siglip"), str(tmp_path / "qwen2"),
                                                   s2_scales=[32, 64, 96], max_tiles=12, projector_type="mlp_downsample_3x3")
    assert model.config.projector_type == "mlp_downsample_3x3"
    out = model(**collate([_chat(model, tok2)], tok2.pad_token_id))
    assert torch.isfinite(out.loss)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        NVILAForCausalLM.from_components(str(tmp_path / "nowhere"), str(tmp_path / "qwen2"))


def test_greedy_generation_is_deterministic_and_batch_consistent(model, tok):
    model.eval()
    prompts = []
    for img, q in ((_img(64, 48, 0), "Describe the image."), (_img(90, 30, 1), "What is it?")):
        media = [model.preprocess_image(img)]
        prompts.append(build_chat(tok, [{"role": "user", "content": f"<image>\n{q}"}], media, add_generation_prompt=True))
    singles = []
    for ex in prompts:
        b = collate([ex], tok.pad_token_id)
        a1 = model.generate(b["input_ids"], b["attention_mask"], b["media"], max_new_tokens=6)
        a2 = model.generate(b["input_ids"], b["attention_mask"], b["media"], max_new_tokens=6)
        assert torch.equal(a1, a2)
        singles.append(a1[0])
    both = collate(prompts, tok.pad_token_id)
    batched = model.generate(both["input_ids"], both["attention_mask"], both["media"], max_new_tokens=6)
    for i in range(2):
        assert torch.equal(batched[i], singles[i])


def test_bad_inputs_have_clear_errors(model, tok):
    with pytest.raises(ConfigError, match="unknown projector_type 'mlp_4x4'"):
        tiny_config(len(tok), projector_type="mlp_4x4")
    with pytest.raises(ConfigError, match="not divisible by the patch size"):
        NVILAConfig(vision_config=dict(image_size=30, patch_size=8, hidden_size=32), llm_config=dict(hidden_size=64))
    with pytest.raises(ValueError, match="2 media tokens but 1 media were given"):
        build_chat(tok, [{"role": "user", "content": "<image><image> compare"}], [model.preprocess_image(_img())])
    with pytest.raises(ValueError, match="image cannot be decoded"):
        model.preprocess_image(b"not an image at all")
    ex = _chat(model, tok)
    with pytest.raises(SequenceTooLong, match="needs .* positions"):
        ex.num_media_tokens = 500
        collate([ex], tok.pad_token_id, max_length=256)
    batch = collate([_chat(model, tok)], tok.pad_token_id)
    with pytest.raises(ValueError, match="1 media tokens but 0 media"):
        model(batch["input_ids"], batch["attention_mask"], batch["labels"], [[]])


# --------------------------------------------------------------------------- FP8


def _batches(model, tok, n=4):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        exs = []
        for j in range(4):
            c = CAPTIONS[(i * 4 + j) % len(CAPTIONS)]
            color, shape, bg = c.split()[1], c.split()[2], c.split()[5]
            img = encode_image(render_scene(Scene(shape, color, bg, "center"), 48, 48, rng), "png")
            exs.append(build_chat(tok, [{"role": "user", "content": "<image>\nDescribe the image."},
                                        {"role": "assistant", "content": c}], [model.preprocess_image(img)]))
        out.append(collate(exs, tok.pad_token_id))
    return out


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_fp8_emulation_sqnr_of_outputs_and_gradients(model, tok, recipe):
    batch = _batches(model, tok, 1)[0]
    fp8 = copy.deepcopy(model)
    summary = convert_to_fp8(fp8, recipe, emulate=True)
    assert summary["emulated"] and summary["converted"]
    assert not any(n.endswith("lm_head") for n in summary["converted"])
    assert all(n in summary["skipped"] for n in ("llm.lm_head",))
    ref_out = model(**batch)
    out = fp8(**batch)
    ref_out.loss.backward()
    out.loss.backward()
    assert sqnr(ref_out.logits, out.logits) >= 20
    ref_g = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    got_g = torch.cat([p.grad.flatten() for p in fp8.parameters() if p.grad is not None])
    assert sqnr(ref_g, got_g) >= 20


def test_fp8_training_run_tracks_full_precision(model, tok):
    batches = _batches(model, tok, 4)

    def train(m, steps=24):
        torch.manual_seed(0)
        opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
        losses = []
        for s in range(steps):
            loss = m(**batches[s % len(batches)]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    fp8 = copy.deepcopy(model)
    convert_to_fp8(fp8, "tensorwise", emulate=True)
    ref, got = train(model), train(fp8)
    assert ref[-1] < ref[0] * 0.7  # it learns
    final_ref, final_fp8 = np.mean(ref[-4:]), np.mean(got[-4:])
    assert abs(final_fp8 - final_ref) / final_ref <= 0.02, (final_ref, final_fp8)


def test_real_fp8_refused_without_hardware(model):
    has, why = fp8_hardware()
    if has:
        pytest.skip(f"this machine has FP8 hardware: {why}")
    with pytest.raises(FP8UnsupportedError, match="cannot run it"):
        convert_to_fp8(copy.deepcopy(model), "rowwise", emulate=False)
    with pytest.raises(ValueError, match="unknown FP8 recipe"):
        convert_to_fp8(copy.deepcopy(model), "blockwise")


def test_fp8_optimizer_states_train(model, tok):
    """AdamW with FP8 moment buffers (torchao low-bit optimizer) trains the tiny model on CPU."""
    from model.fp8 import fp8_optimizer

    batches = _batches(model, tok, 2)
    opt = fp8_optimizer([p for p in model.projector.parameters()], lr=2e-3)
    losses = []
    for s in range(8):
        loss = model(**batches[s % 2]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # torchao keeps tiny tensors (norms, biases) in full precision; the big matrices go to FP8
    biggest = max(model.projector.parameters(), key=lambda p: p.numel())
    assert type(opt.state[biggest]["exp_avg"]).__name__ == "OptimStateFp8"
    assert losses[-1] < losses[0]
