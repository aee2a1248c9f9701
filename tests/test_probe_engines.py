"""benchmarks/fidelity/probe_engines.py end to end on the CPU (tiny model, one engine), and
the skinny-GEMM plan at a glance (engine.kernel_plan.describe, experiments.calibrate.skinny_plan)."""
import bench_scripts
import json
import pathlib
from types import SimpleNamespace

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_probe():
    return bench_scripts.load("benchmarks/fidelity/probe_engines.py")


def test_skinny_plan_names_each_layer_shape_and_row_count():
    torch = pytest.importorskip("torch")
    from engine.kernel_plan import FORMAT, describe
    from experiments.calibrate import skinny_plan
    plan = {"format": FORMAT, "device": "gpu0", "skinny": {
        "4096x1024/bfloat16": {"plan": [[1, 4], [2, 0]]},
        "1024x3072/bfloat16/swiglu": {"plan": [[1, 6]], "swiglu": [[1, 2]]},
        "6144x1024/bfloat16/norm": {"plan": [[8, 0]], "norm": [[8, 1]]}}}
    assert describe(plan) == {"4096x1024/m1": "split4", "4096x1024/m2": "torch",
                              "1024x3072/m1": "split6+swiglu2", "6144x1024/m8": "torch+norm1"}
    assert skinny_plan(SimpleNamespace(model_runner=SimpleNamespace(model=torch.nn.Module()))) == {}


def test_probe_times_every_shape_with_each_kind_of_data(capsys):
    pytest.importorskip("torch")
    probe = load_probe()
    probe.main(["--model", "tiny-qwen3", "--hardware", "h200", "--engines", "1", "--batches", "1,2,9",
                "--context", "16", "--chunks", "8,100", "--repeats", "1", "--set", "engine=cpu",
                "scheduler.max_num_seqs=4", "scheduler.max_num_batched_tokens=64",
                "scheduler.max_model_len=128", "cache.num_blocks=64"])
    out = capsys.readouterr().out
    result = json.loads(out.strip().splitlines()[-1])
    # batches past max_num_seqs and chunks past the token budget are left out, not run
    assert [r["shape"] for r in result["rows"]] == ["decode 1 x 16", "decode 2 x 16", "chunk 5 + 3 decodes"]
    for r in result["rows"]:
        assert set(r["ms"]["e1"]) == set(probe.DATA) and all(v > 0 for v in r["ms"]["e1"].values())
        assert r["engines_spread"] == 0.0 and r["kind"] == "eager"
    assert result["rows"][2]["rows"] == 8 and result["plan_differences"] == {}
    with pytest.raises(SystemExit, match="exceeds scheduler.max_model_len"):
        probe.main(["--model", "tiny-qwen3", "--hardware", "h200", "--context", "999",
                    "--set", "engine=cpu", "scheduler.max_model_len=128"])
