"""Load and save NVILA in VILA's three-folder layout (see ``model.vila_layout`` for the format).

A model loaded from VILA's layout remembers what it read (the configs as dicts, the folders'
other files as bytes); saving it back writes those unchanged where the model has not changed,
so a load/save round trip reproduces the directory byte for byte.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import torch

from model.config import ConfigError, MEDIA_TOKENS
from model.vila_layout import (FROM_VILA_PROJECTOR, LLM_DIR, PROJECTOR_DIR, SAFETENSORS, SEQUENTIAL_INDEX, TO_VILA_PROJECTOR, VISION_DIR,
                               config_to_vila, overlay, read_json, same_value, vila_to_config, write_json)


def _weight_files(d: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(d, "*.safetensors")))
    if not files:
        raise ConfigError(f"VILA checkpoint: {d} has no .safetensors weights")
    return files


def _file_tensors(d: str) -> dict[str, Any]:
    """name -> tensor for every tensor of every weight file in ``d`` (a name twice is an error)."""
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in _weight_files(d):
        for k, v in load_file(f).items():
            if k in out:
                raise ConfigError(f"VILA checkpoint: tensor {k!r} appears in more than one file of {d}")
            out[k] = v
    return out


def _file_keys(d: str) -> set[str]:
    from safetensors import safe_open

    keys: set[str] = set()
    for f in _weight_files(d):
        with safe_open(f, framework="pt") as h:
            keys |= set(h.keys())
    return keys


def _extras(d: str) -> dict[str, bytes]:
    """The folder's files other than weights and config.json (tokenizer, preprocessor, generation)."""
    out = {}
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if os.path.isfile(p) and name != "config.json" and not name.endswith((".safetensors", ".safetensors.index.json")):
            with open(p, "rb") as f:
                out[name] = f.read()
    return out


def _load_part(cls: Any, d: str, what: str, dtype: torch.dtype) -> tuple[Any, bool]:
    """``cls.from_pretrained(d)`` with strict accounting: every file tensor used, none missing.
    Also says whether the file's names carry the base-model prefix (SigLIP's ``vision_model.``,
    as transformers 4 wrote them) where the model's do not."""
    model, info = cls.from_pretrained(d, dtype=dtype, output_loading_info=True)
    have, pre = set(model.state_dict()), cls.base_model_prefix + "."
    keys = _file_keys(d)
    prefixed = bool(keys) and all(k not in have and k.startswith(pre) for k in keys)
    unused = sorted(k for k in keys if k not in have and not (k.startswith(pre) and k[len(pre):] in have))
    missing = sorted(set(info.get("missing_keys") or ()))
    mismatched = sorted(str(m[0] if isinstance(m, (tuple, list)) else m) for m in info.get("mismatched_keys") or ())
    if unused or missing or mismatched:
        raise ConfigError(f"VILA checkpoint {what} ({d}) does not match its config: "
                          f"unused tensors {unused[:8]}, missing {missing[:8]}, wrong shape {mismatched[:8]}")
    return model, prefixed


def _check_preprocessor(d: str, tile: int) -> None:
    p = os.path.join(d, "preprocessor_config.json")
    if not os.path.isfile(p):
        raise ConfigError(f"VILA checkpoint: {p} not found (the vision tower's image preprocessing)")
    pre = read_json(p)
    size = pre.get("size") or {}
    got = (size.get("height"), size.get("width")) if isinstance(size, dict) else (size, size)
    if got != (tile, tile):
        raise ConfigError(f"{p}: field 'size' = {size!r}, expected {tile}x{tile} (the tower's image_size)")
    for k in ("image_mean", "image_std"):
        if [round(float(x), 6) for x in pre.get(k, [0.5] * 3)] != [0.5] * 3:
            raise ConfigError(f"{p}: field {k!r} = {pre[k]!r} is not supported; SigLIP normalizes with 0.5")


def projector_to_vila(projector_type: str, state: dict[str, Any]) -> dict[str, Any]:
    """Our projector's state dict -> VILA's ``layers.N.*`` names."""
    out = {}
    for sub, idx in SEQUENTIAL_INDEX[projector_type].items():
        for p in ("weight", "bias"):
            out[f"layers.{idx}.{p}" if idx is not None else f"layers.{p}"] = state[f"{sub}.{p}"]
    return out


def projector_from_vila(projector_type: str, tensors: dict[str, Any], d: str) -> dict[str, Any]:
    names = {(f"layers.{idx}.{p}" if idx is not None else f"layers.{p}"): f"{sub}.{p}"
             for sub, idx in SEQUENTIAL_INDEX[projector_type].items() for p in ("weight", "bias")}
    unused, missing = sorted(set(tensors) - set(names)), sorted(set(names) - set(tensors))
    if unused or missing:
        raise ConfigError(f"VILA checkpoint projector ({d}): unused tensors {unused}, missing {missing} "
                          f"for projector type {projector_type}")
    return {ours: tensors[theirs] for theirs, ours in names.items()}


def vila_tokenizer(path: str) -> Any:
    """``llm/``'s tokenizer with NVILA's media tokens appended where missing (in a fixed order, so
    every load gives them the same ids)."""
    from model.nvila import load_tokenizer_dir

    tok = load_tokenizer_dir(os.path.join(path, LLM_DIR))
    missing = [t for t in MEDIA_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_tokens(missing, special_tokens=True)
    return tok


def load_vila(cls: Any, path: str, dtype: torch.dtype | None = None) -> Any:
    from transformers import Qwen2ForCausalLM, SiglipVisionModel

    top = read_json(os.path.join(path, "config.json"))
    pdir, vdir, ldir = (os.path.join(path, d) for d in (PROJECTOR_DIR, VISION_DIR, LLM_DIR))
    proj_raw = read_json(os.path.join(pdir, "config.json"))
    ptype = proj_raw.get("mm_projector_type")
    top_p = top.get("mm_projector_cfg")
    if isinstance(top_p, dict) and top_p.get("mm_projector_type") not in (None, ptype):
        raise ConfigError(f"VILA config field 'mm_projector_cfg.mm_projector_type' = {top_p['mm_projector_type']!r} "
                          f"but {pdir}/config.json says {ptype!r}")
    for d, want, field in ((ldir, "qwen2", "llm_cfg"), (vdir, "siglip_vision_model", "vision_tower_cfg")):
        got = read_json(os.path.join(d, "config.json")).get("model_type")
        if got != want:
            raise ConfigError(f"VILA config field '{field}.model_type' = {got!r} is not supported; expected {want!r}")
    load_dtype = dtype or torch.float32
    llm, _ = _load_part(Qwen2ForCausalLM, ldir, "llm", load_dtype)
    vision, vision_prefixed = _load_part(SiglipVisionModel, vdir, "vision_tower", load_dtype)
    config = vila_to_config(top, ptype, vision.config.to_dict(), llm.config.to_dict())
    _check_preprocessor(vdir, config.tile_size)
    model = cls(config, vision, llm)
    state = projector_from_vila(config.projector_type, _file_tensors(pdir), pdir)
    try:
        model.projector.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"VILA checkpoint projector ({pdir}) does not fit {config.projector_type}: {e}") from None
    model.projector.to(load_dtype)
    source = {"top": top, "projector": proj_raw, "vision_prefixed": vision_prefixed,
              "llm": read_json(os.path.join(ldir, "config.json")), "vision": read_json(os.path.join(vdir, "config.json")),
              "extras": {LLM_DIR: _extras(ldir), VISION_DIR: _extras(vdir), PROJECTOR_DIR: _extras(pdir)}}
    # before the media tokens: embeddings grown for a missing <vila/sep> are a change to write
    source["loaded"] = _current(model)
    tok = vila_tokenizer(path)
    source["vocab"] = tok.get_vocab()
    model.attach_tokenizer(tok)
    model.vila_source = source
    return model


def _current(model: Any) -> dict[str, Any]:
    return {"llm": model.llm.config.to_dict(), "vision": model.vision_tower.model.config.to_dict(),
            "fields": config_to_vila(model.config)}


def _unique_state(module: Any, dtype: torch.dtype) -> dict[str, Any]:
    """State dict without the second name of a tied tensor (as transformers saves), cast to ``dtype``."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in module.state_dict().items():
        if v.data_ptr() in seen and v.numel():
            continue
        seen[v.data_ptr()] = k
        out[k] = v.detach().to("cpu", dtype).contiguous()
    return out


def _save_part(module: Any, d: str, dtype: torch.dtype, raw: dict | None, loaded: dict | None, extras: dict | None,
               prefix: str = "") -> None:
    from safetensors.torch import save_file

    os.makedirs(d, exist_ok=True)
    state = {prefix + k: v for k, v in _unique_state(module, dtype).items()}
    save_file(state, os.path.join(d, SAFETENSORS), metadata={"format": "pt"})
    if raw is None:
        module.config.save_pretrained(d)
    else:
        write_json(os.path.join(d, "config.json"), overlay(raw, loaded, module.config.to_dict()))
    for name, data in (extras or {}).items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def save_vila(model: Any, path: str, tokenizer: Any | None = None) -> str:
    """Write VILA's layout (weights in the source's ``model_dtype``, bf16 for a model of ours)."""
    src = getattr(model, "vila_source", None) or {}
    top_raw = src.get("top")
    dtype_name = (top_raw or {}).get("model_dtype", "torch.bfloat16")
    dtype = getattr(torch, dtype_name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ConfigError(f"VILA config field 'model_dtype' = {dtype_name!r} is not a torch dtype")
    loaded = src.get("loaded") or {}
    extras = src.get("extras") or {}
    ldir, vdir, pdir = (os.path.join(path, d) for d in (LLM_DIR, VISION_DIR, PROJECTOR_DIR))
    _save_part(model.llm, ldir, dtype, src.get("llm"), loaded.get("llm"), extras.get(LLM_DIR))
    # SigLIP's names as VILA's transformers 4 wrote them (vision_model.*) unless the source had them bare
    tower = model.vision_tower.model
    prefix = tower.base_model_prefix + "." if src.get("vision_prefixed", top_raw is None) else ""
    _save_part(tower, vdir, dtype, src.get("vision"), loaded.get("vision"), extras.get(VISION_DIR), prefix)
    if not extras.get(LLM_DIR) and getattr(model.llm, "generation_config", None) is not None:
        model.llm.generation_config.save_pretrained(ldir)
    if not extras.get(VISION_DIR):
        from transformers import SiglipImageProcessor

        t = model.config.tile_size
        SiglipImageProcessor(size={"height": t, "width": t}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(vdir)
    _save_projector(model, pdir, dtype, src.get("projector"), extras.get(PROJECTOR_DIR))
    if tokenizer is not None and tokenizer.get_vocab() != src.get("vocab"):
        tokenizer.save_pretrained(ldir)  # the source's tokenizer files stay as they were otherwise
    write_json(os.path.join(path, "config.json"), _top_config(model, path, dtype_name, src))
    return path


def _save_projector(model: Any, d: str, dtype: torch.dtype, raw: dict | None, extras: dict | None) -> None:
    from safetensors.torch import save_file
    import transformers

    os.makedirs(d, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.projector.state_dict().items()}
    save_file(projector_to_vila(model.config.projector_type, state), os.path.join(d, SAFETENSORS),
              metadata={"format": "pt"})
    vila_type = TO_VILA_PROJECTOR[model.config.projector_type]
    if raw is not None and FROM_VILA_PROJECTOR.get(raw.get("mm_projector_type")) == model.config.projector_type:
        cfg = raw
    else:
        cfg = {**(raw or {}), "architectures": ["MultimodalProjector"], "mm_projector_type": vila_type,
               "model_type": "v2l_projector", "torch_dtype": str(dtype).replace("torch.", ""),
               "transformers_version": transformers.__version__}
    write_json(os.path.join(d, "config.json"), cfg)
    for name, data in (extras or {}).items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


def _top_config(model: Any, path: str, dtype_name: str, src: dict[str, Any]) -> dict[str, Any]:
    import transformers

    top_raw = src.get("top")
    loaded = src.get("loaded") or {}
    now = config_to_vila(model.config)
    if top_raw is None:
        now.update({"_name_or_path": os.path.abspath(path), "architectures": ["LlavaLlamaModel"],
                    "model_type": "llava_llama", "model_dtype": dtype_name, "resume_path": os.path.abspath(path),
                    "transformers_version": transformers.__version__})
    out = overlay(top_raw, loaded.get("fields"), now, compare=same_value)
    cur = _current(model)
    for key, part in (("llm_cfg", "llm"), ("vision_tower_cfg", "vision")):
        raw = top_raw.get(key) if top_raw and isinstance(top_raw.get(key), dict) else None
        out[key] = overlay(raw, loaded.get(part), cur[part])
    proj = read_json(os.path.join(path, PROJECTOR_DIR, "config.json"))
    raw_p = top_raw.get("mm_projector_cfg") if top_raw else None
    out["mm_projector_cfg"] = raw_p if isinstance(raw_p, dict) and raw_p.get("mm_projector_type") == proj["mm_projector_type"] else proj
    return out
