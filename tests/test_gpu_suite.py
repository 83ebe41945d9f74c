"""``benchmarks/gpu_suite.py --smoke``: every arm of the GPU suite at tiny sizes on the CPU, so the
script cannot rot between the runs on a GPU (its figures come from those runs, not from here)."""

import json


def test_gpu_suite_smoke_runs_every_arm(tmp_path):
    from benchmarks.gpu_suite import main

    out = tmp_path / "smoke.json"
    main(["--smoke", "--json", str(out)])
    r = json.loads(out.read_text())
    clip = r["clip"]["tiny-clip"]
    for key in ("model_only_img_s", "end_to_end_cpu_decode_img_s", "end_to_end_gpu_decode_img_s"):
        assert clip[key] > 0, key
    assert r["deltaloss"]["samples_per_s"] > 0
    for arm in ("bf16", "float8_tensorwise"):  # float8 in emulation on the CPU
        step = r["training"][arm]["equal_batch"]
        assert step["tokens_per_s"] > 0 and step["batch"] == 2
