"""FP8 training-step throughput (issue: bundled NVILA with FP8).

Arms of one run, on the same model, batches and settings, compiled all (``--compile``) or none:

- on a CPU: full precision vs torchao FP8 emulation (tensorwise and rowwise). Emulation is
  expected to be slower: it quantizes and dequantizes around every matmul; the point is that
  the path works;
- on a CUDA GPU: bf16 autocast vs real FP8 (tensorwise, rowwise; needs compute capability >=
  8.9, else the FP8 arms are skipped with the reason), plus the FP8 vs bf16 speedup of a
  realistic linear layer (4096 x 4096, 16k tokens), forward + backward.

Tokens per step are the LLM positions of the batch as the model lays them out: text tokens
plus each image's tokens from its real tile layout (``model.image_processing.layout_token_count``),
not a fixed number per image.

    python benchmarks/bench_fp8.py [--steps 10] [--batch 8] [--compile] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import numpy as np
import torch


def small_model():
    from model import NVILAConfig, NVILAForCausalLM
    from model.tokenizer import train_bpe_tokenizer

    words = [f"a {c} {s}" for c in ("red", "green", "blue", "white") for s in ("circle", "square", "star")]
    tok = train_bpe_tokenizer(words * 10 + ["Describe the image."], vocab_size=400)
    vc = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=64, patch_size=8)
    lc = dict(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    m = NVILAForCausalLM(NVILAConfig(vision_config=vc, llm_config=lc, image_mode="resize"))
    m.attach_tokenizer(tok)
    return m, tok


def batches(m, tok, n: int, bs: int):
    """``n`` batches of ``bs`` captioned images, each with the LLM positions it takes."""
    from curation.corpus.synth import Scene, encode_image, render_scene
    from model.conversation import build_chat, collate
    from model.image_processing import layout_token_count

    c = m.config
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        exs = []
        for j in range(bs):
            img = encode_image(render_scene(Scene("circle", "red", "blue", "center"), 64, 64, rng), "png")
            media = [m.preprocess_image(img)]
            length = layout_token_count(media[0].layout, mode=c.image_mode, tile=c.tile_size, patch=c.patch_size,
                                        projector=c.projector_type)
            exs.append(build_chat(tok, [{"role": "user", "content": "<image>\nDescribe the image."},
                                        {"role": "assistant", "content": "a red circle on a blue background " * 4}],
                                  media, media_lengths=[length]))
        out.append((collate(exs, tok.pad_token_id), sum(e.length for e in exs)))
    return out


def step_rate(m, data, steps: int, device: str, bf16: bool, compile_: bool) -> tuple[float, float]:
    from training_hooks.device import to_device

    m = m.to(device)
    step_model = torch.compile(m) if compile_ else m
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    tokens = 0
    for i in range(steps + 2):
        if i == 2:  # warm-up (and compilation) out of the timing
            _sync(device)
            t0, tokens = time.perf_counter(), 0
        b, n = data[i % len(data)]
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = step_model(**to_device(b, torch.device(device))).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        tokens += n
    _sync(device)
    dt = time.perf_counter() - t0
    return tokens / dt, steps / dt


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gpu_layer_speedup(compile_: bool) -> dict | None:
    from model.fp8 import convert_to_fp8, fp8_hardware

    has, why = fp8_hardware()
    if not has:
        return {"skipped": why}
    torch.manual_seed(0)
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False)).cuda().bfloat16()
    fp8 = copy.deepcopy(ref)
    convert_to_fp8(fp8, "tensorwise", emulate=False)
    if compile_:  # both arms or neither
        ref, fp8 = torch.compile(ref), torch.compile(fp8)

    def bench(mod):
        for _ in range(3):
            mod(x).sum().backward()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            mod(x).sum().backward()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / 20

    b, f = bench(ref), bench(fp8)
    return {"device": why, "compiled": compile_, "bf16_ms": round(b * 1e3, 3), "fp8_ms": round(f * 1e3, 3),
            "speedup": round(b / f, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--compile", action="store_true", help="torch.compile every arm (default: none)")
    ap.add_argument("--json")
    args = ap.parse_args()

    from model.fp8 import convert_to_fp8, fp8_hardware

    torch.set_num_threads(2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base, tok = small_model()
    data = batches(base, tok, 4, args.batch)
    ref_name = "bf16" if device == "cuda" else "full"
    has_fp8, why = fp8_hardware()
    results: dict = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "compiled": args.compile,
                     "tokens_per_step": [n for _, n in data]}
    for name in (ref_name, "tensorwise", "rowwise"):
        if name != ref_name and device == "cuda" and not has_fp8:
            results[name] = {"skipped": why}
            continue
        m = copy.deepcopy(base)
        if name != ref_name:
            convert_to_fp8(m, name, emulate=device == "cpu")
        tps, sps = step_rate(m, data, args.steps, device, bf16=device == "cuda", compile_=args.compile)
        results[name] = {"tokens_per_s": round(tps, 1), "steps_per_s": round(sps, 3)}
    results["gpu_layer"] = gpu_layer_speedup(args.compile) if device == "cuda" else {"skipped": "no CUDA device"}
    kind = "real FP8 vs bf16 autocast" if device == "cuda" else "FP8 emulation vs full precision"
    print(f"training step, small NVILA (LLM 256x4, SigLIP 128x4), batch {args.batch}, {results['device']}, {kind}, "
          f"{'all arms compiled' if args.compile else 'no arm compiled'}; {results['tokens_per_step'][0]} LLM tokens per step")
    for name in (ref_name, "tensorwise", "rowwise"):
        r = results[name]
        if "skipped" in r:
            print(f"  {name:<11}: skipped ({r['skipped']})")
            continue
        print(f"  {name:<11}: {r['tokens_per_s']:9.1f} tokens/s  {r['steps_per_s']:.3f} steps/s  "
              f"({r['tokens_per_s'] / results[ref_name]['tokens_per_s']:.2f}x of {ref_name})")
    print(f"  GPU FP8 vs bf16 (4096x4096 linear, 16k tokens): {results['gpu_layer']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
