"""VILA's on-disk layout for NVILA checkpoints, read strictly and written back.

VILA (``LlavaMetaModel.save_pretrained``) writes a model as three folders and a top config:

- ``config.json``: ``llm_cfg``, ``vision_tower_cfg``, ``mm_projector_cfg`` (the three parts'
  configs) and the media fields (``image_aspect_ratio``, ``dynamic_s2``, ``s2_scales`` as
  ``"448,896,1344"``, ``max_tiles``, ``mm_vision_select_layer``, ``num_video_frames``, ...);
- ``llm/``: a transformers Qwen2 directory with its tokenizer;
- ``vision_tower/``: a transformers SigLIP vision directory with ``preprocessor_config.json``;
- ``mm_projector/``: ``config.json`` (``model_type: v2l_projector``, ``mm_projector_type``) and
  the weights named after VILA's ``nn.Sequential``: ``layers.N.weight`` / ``layers.N.bias``.

Reading is strict: every tensor of every file is used and none is missing, and every top
config field is either mapped onto ``NVILAConfig``, checked to hold the one value this model
implements, or known to be training bookkeeping; anything else is a ``ConfigError`` naming it.
VILA's media encoders end each image and each video frame with the embedding of ``"\n"``; here
the prompt's text puts ``"\n"`` after ``<image>``, and pooled video frames end with ``<vila/sep>``.
Writing keeps the fields read (so an unchanged model is written back byte for byte) and
overwrites only what the model now says differently.
"""

from __future__ import annotations

import json
import os
from typing import Any

from model.config import ConfigError, NVILAConfig

LLM_DIR, VISION_DIR, PROJECTOR_DIR = "llm", "vision_tower", "mm_projector"
SAFETENSORS = "model.safetensors"

# VILA projector type -> ours; the "fix" 2x2 block and the current ``mlp_downsample`` fold the
# same 2x2 neighbourhoods into channels in the same row-major token order
FROM_VILA_PROJECTOR = {"mlp_downsample": "mlp_downsample_2x2", "mlp_downsample_2x2_fix": "mlp_downsample_2x2",
                       "mlp_downsample_3x3_fix": "mlp_downsample_3x3", "linear": "linear"}
TO_VILA_PROJECTOR = {"mlp_downsample_2x2": "mlp_downsample_2x2_fix", "mlp_downsample_3x3": "mlp_downsample_3x3_fix",
                     "linear": "linear"}
# our projector's submodule -> its index in VILA's nn.Sequential (index 0 is the parameter-free
# downsample block, GELUs take the odd places between); linear is a bare nn.Linear: "layers"
SEQUENTIAL_INDEX = {
    "mlp_downsample_2x2": {"norm": "1", "fc1": "2", "fc2": "4"},
    "mlp_downsample_3x3": {"norm1": "1", "fc1": "2", "norm2": "4", "fc2": "5", "fc3": "7"},
    "linear": {"proj": None},
}

# fields that say how VILA trained or where it saved, not what the model computes
BOOKKEEPING = {
    "_name_or_path", "architectures", "transformers_version", "model_type", "resume_path", "model_dtype",
    "tune_vision_tower", "tune_mm_projector", "tune_language_model", "mm_projector_lr", "vision_tower_lr",
    "drop_path_rate", "soft_ce_std", "chat_template", "time_token_format", "time_token_ids",
    "mm_use_im_patch_token", "_attn_implementation_autoset", "interpolate_mode", "torch_dtype", "dtype",
    "num_look_close", "num_token_look_close", "top_down_prompt_head_type", "look_close_mode",
    "high_res_pos_embed", "ps3_dynamic_aspect_ratio", "mm_low_res_token_num", "mm_scale_num",
}
# fields whose only value this model implements (None: absent)
FIXED = {
    "mm_use_im_start_end": (False, None), "s2": (False, None), "ps3": (False, None),
    "mm_vision_select_feature": ("cls_patch", None),  # SigLIP has no CLS: every token is a patch
    "s2_resize_output_to_scale_idx": (-1, None),  # the merged map takes the last scale's size
    "vision_resolution": (-1, None), "video_max_tiles": (1, None), "min_tiles": (1, None),
    "num_time_tokens": (0, None), "fps": (0, 0.0, None),  # fps > 0: frames sampled by time, not by count
}
MAPPED = {"llm_cfg", "vision_tower_cfg", "mm_projector_cfg", "image_aspect_ratio", "dynamic_s2", "s2_scales", "image_encoder",
          "s2_max_split_size", "max_tiles", "mm_vision_select_layer", "num_video_frames", "video_encoder",
          "mm_hidden_size", "hidden_size"}
TSP_ENCODER = "llava.model.encoders.TSPVideoEncoder"


def is_vila_dir(path: str) -> bool:
    """A top ``config.json`` with ``llm_cfg``, or the three part folders."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            if "llm_cfg" in json.load(f):
                return True
    except (OSError, ValueError):
        pass
    return all(os.path.isdir(os.path.join(path, d)) for d in (LLM_DIR, VISION_DIR, PROJECTOR_DIR))


def read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"VILA checkpoint: {path} not found")
    with open(path) as f:
        return json.load(f)


def write_json(path: str, d: dict[str, Any]) -> None:
    """transformers' format (``PretrainedConfig.to_json_string``): sorted keys, indent 2, newline."""
    with open(path, "w") as f:
        f.write(json.dumps(d, indent=2, sort_keys=True) + "\n")


def _scales(v: Any) -> list[int]:
    if isinstance(v, str):
        return [int(x) for x in v.split(",") if x.strip()]
    return [int(x) for x in v]


def _video_pool(v: Any) -> int:
    if v is None:
        return 1  # VILA's default BasicVideoEncoder: no pooling
    enc = json.loads(v) if isinstance(v, str) else dict(v)
    target = enc.get("_target_", "")
    if target.endswith("BasicVideoEncoder") and set(enc) <= {"_target_", "end_tokens"}:
        return 1
    sizes = enc.get("pool_sizes")
    if target == TSP_ENCODER and isinstance(sizes, list) and len(sizes) == 1 and list(sizes[0])[1:] == [1, 1]:
        return int(sizes[0][0])
    raise ConfigError(f"VILA config field 'video_encoder' = {v!r} is not supported: this model pools frames in time "
                      f"only (TSPVideoEncoder with pool_sizes [[n, 1, 1]]) or not at all (BasicVideoEncoder)")


def _check_image_encoder(v: Any) -> None:
    if v is None:
        return
    try:
        enc = json.loads(v) if isinstance(v, str) else dict(v)
    except (ValueError, TypeError):
        enc = {}
    if not (str(enc.get("_target_", "")).endswith("BasicImageEncoder") and set(enc) <= {"_target_", "end_tokens"}):
        raise ConfigError(f"VILA config field 'image_encoder' = {v!r} is not supported; this model implements "
                          f"BasicImageEncoder")


def check_fields(top: dict[str, Any]) -> None:
    """Every top field is mapped, fixed at a value we implement, or bookkeeping."""
    _check_image_encoder(top.get("image_encoder"))
    for k, v in top.items():
        if k in MAPPED or k in BOOKKEEPING:
            continue
        if k not in FIXED:
            raise ConfigError(f"VILA config field {k!r} is not supported by this NVILA implementation "
                              f"(value {v!r}); remove it only if it does not change what the model computes")
        if v not in FIXED[k]:
            raise ConfigError(f"VILA config field {k!r} = {v!r} is not supported; this model implements "
                              f"{FIXED[k][0]!r}")


def vila_to_config(top: dict[str, Any], projector_type: str, vision: dict, llm: dict) -> NVILAConfig:
    """Map VILA's top config onto ``NVILAConfig`` (the parts' configs given separately)."""
    check_fields(top)
    if projector_type not in FROM_VILA_PROJECTOR:
        raise ConfigError(f"VILA mm_projector_type {projector_type!r} is not supported; supported: "
                          f"{', '.join(FROM_VILA_PROJECTOR)}")
    aspect = top.get("image_aspect_ratio") or "resize"
    modes = {"dynamic_s2": "dynamic_s2", "dynamic": "dynamic", "resize": "resize"}
    if aspect not in modes:
        raise ConfigError(f"VILA config field 'image_aspect_ratio' = {aspect!r} is not supported; supported: "
                          f"{', '.join(modes)}")
    if bool(top.get("dynamic_s2")) != (aspect == "dynamic_s2"):
        raise ConfigError(f"VILA config field 'dynamic_s2' = {top.get('dynamic_s2')!r} contradicts "
                          f"image_aspect_ratio {aspect!r}")
    kw: dict[str, Any] = {"vision_config": vision, "llm_config": llm, "image_mode": modes[aspect],
                          "projector_type": FROM_VILA_PROJECTOR[projector_type],
                          "video_pool_size": _video_pool(top.get("video_encoder"))}
    if top.get("s2_scales") is not None:
        kw["s2_scales"] = _scales(top["s2_scales"])
    for ours, theirs in (("max_tiles", "max_tiles"), ("vision_feature_layer", "mm_vision_select_layer"),
                         ("video_num_frames", "num_video_frames")):
        if top.get(theirs) is not None:
            kw[ours] = int(top[theirs])
    config = NVILAConfig(**kw)
    tile = config.tile_size
    if aspect == "dynamic_s2" and top.get("s2_max_split_size") not in (None, tile):
        raise ConfigError(f"VILA config field 's2_max_split_size' = {top['s2_max_split_size']!r} must be the tile "
                          f"size {tile}")
    want_mm = config.vision_hidden * config.num_scales
    if top.get("mm_hidden_size") is not None and int(top["mm_hidden_size"]) != want_mm:
        raise ConfigError(f"VILA config field 'mm_hidden_size' = {top['mm_hidden_size']} but the vision tower gives "
                          f"{want_mm} channels ({config.vision_hidden} x {config.num_scales} scales)")
    if top.get("hidden_size") is not None and int(top["hidden_size"]) != config.llm_hidden:
        raise ConfigError(f"VILA config field 'hidden_size' = {top['hidden_size']} but llm/ has hidden_size "
                          f"{config.llm_hidden}")
    return config


def config_to_vila(config: NVILAConfig) -> dict[str, Any]:
    """The top fields VILA reads, as this model's config says them."""
    s2 = config.image_mode == "dynamic_s2"
    pool = config.video_pool_size
    video = (json.dumps({"_target_": TSP_ENCODER, "pool_sizes": [[pool, 1, 1]]}) if pool > 1
             else json.dumps({"_target_": "llava.model.encoders.BasicVideoEncoder"}))
    return {
        "image_aspect_ratio": config.image_mode, "dynamic_s2": s2,
        "s2_scales": ",".join(str(s) for s in config.s2_scales), "s2_max_split_size": config.tile_size,
        "max_tiles": config.max_tiles, "mm_vision_select_layer": config.vision_feature_layer,
        "mm_vision_select_feature": "cls_patch", "num_video_frames": config.video_num_frames,
        "video_encoder": video, "mm_hidden_size": config.vision_hidden * config.num_scales,
        "hidden_size": config.llm_hidden, "s2": False, "mm_use_im_start_end": False,
    }


def same_value(key: str, a: Any, b: Any) -> bool:
    """Whether a field read from disk says the same as the one the model would write."""
    if key == "s2_scales" and a is not None and b is not None:
        return _scales(a) == _scales(b)
    if key == "video_encoder":
        try:
            return _video_pool(a) == _video_pool(b)
        except ConfigError:
            return False
    return a == b


def overlay(raw: dict[str, Any] | None, loaded: dict[str, Any] | None, now: dict[str, Any],
            compare=lambda k, a, b: a == b) -> dict[str, Any]:
    """``raw`` (as read) with the keys where ``now`` differs from what loading gave (``loaded``)."""
    if raw is None:
        return dict(now)
    out = dict(raw)
    base = loaded if loaded is not None else raw
    for k, v in now.items():
        if k not in base or not compare(k, base[k], v):
            out[k] = v
    return out
