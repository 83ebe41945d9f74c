"""FP8 training-step throughput (issue: bundled NVILA with FP8).

On this CPU: tokens/s of a training step (forward, backward, AdamW) of a small NVILA in full
precision vs torchao FP8 emulation (tensorwise and rowwise). Emulation is expected to be
slower: it quantizes and dequantizes around every matmul; the point is that the path works.
With a CUDA GPU of compute capability >= 8.9: the FP8 vs bf16 speedup of a realistic linear
layer (4096 x 4096, 16k tokens), forward + backward.

    python benchmarks/bench_fp8.py [--steps 10] [--json out.json]
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
    from curation.synth import Scene, encode_image, render_scene
    from model.conversation import build_chat, collate

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        exs = []
        for j in range(bs):
            img = encode_image(render_scene(Scene("circle", "red", "blue", "center"), 64, 64, rng), "png")
            exs.append(build_chat(tok, [{"role": "user", "content": "<image>\nDescribe the image."},
                                        {"role": "assistant", "content": "a red circle on a blue background " * 4}],
                                  [m.preprocess_image(img)]))
        out.append(collate(exs, tok.pad_token_id))
    return out


def step_rate(m, data, steps: int) -> tuple[float, float]:
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    tokens = 0
    for i in range(steps + 2):
        if i == 2:
            t0, tokens = time.perf_counter(), 0
        b = data[i % len(data)]
        loss = m(**b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        # tokens the LLM processed: text + media positions
        tokens += int(b["attention_mask"].sum()) + sum(64 * len(x) for x in b["media"]) - sum(len(x) for x in b["media"])
    dt = time.perf_counter() - t0
    return tokens / dt, steps / dt


def gpu_layer_speedup() -> dict | None:
    from model.fp8 import convert_to_fp8, fp8_hardware

    has, why = fp8_hardware()
    if not has:
        return {"skipped": why}
    torch.manual_seed(0)
    x = torch.randn(16384, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = torch.nn.Sequential(torch.nn.Linear(4096, 4096, bias=False)).cuda().bfloat16()
    fp8 = copy.deepcopy(ref)
    convert_to_fp8(fp8, "tensorwise", emulate=False)
    fp8 = torch.compile(fp8)

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
    return {"device": why, "bf16_ms": round(b * 1e3, 3), "fp8_ms": round(f * 1e3, 3), "speedup": round(b / f, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json")
    args = ap.parse_args()

    from model.fp8 import convert_to_fp8

    torch.set_num_threads(2)
    base, tok = small_model()
    data = batches(base, tok, 4, args.batch)
    results = {}
    for name in ("full", "tensorwise", "rowwise"):
        m = copy.deepcopy(base)
        if name != "full":
            convert_to_fp8(m, name, emulate=True)
        tps, sps = step_rate(m, data, args.steps)
        results[name] = {"tokens_per_s": round(tps, 1), "steps_per_s": round(sps, 3)}
    results["gpu"] = gpu_layer_speedup()
    print(f"training step, small NVILA (LLM 256x4, SigLIP 128x4), batch {args.batch}, CPU")
    for name in ("full", "tensorwise", "rowwise"):
        r = results[name]
        print(f"  {name:<11}: {r['tokens_per_s']:9.1f} tokens/s  {r['steps_per_s']:.3f} steps/s  "
              f"({r['tokens_per_s'] / results['full']['tokens_per_s']:.2f}x of full precision)")
    print(f"  GPU FP8 vs bf16 (4096x4096 linear, 16k tokens): {results['gpu']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
