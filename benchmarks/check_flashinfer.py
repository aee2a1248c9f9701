"""The flashinfer attention backend against triton on the GPU (run on the GPU machine).

    python benchmarks/check_flashinfer.py [--dtypes bfloat16,float16] [--cases graphs,block1]

flashinfer has no float32 attention kernels, so "equal to the fp32 reference" cannot be
asked of it directly. Instead, per tiny random Qwen3 (head_dim 128, std 0.3; GQA 2 takes
flashinfer's CUDA-core decode kernel, GQA 4 its tensor-core one) and per low-precision dtype:

  1. first-step logits of every prompt through the engine's own prefill path, relative
     error against triton in fp32; flashinfer's error must be at most 2x triton's own
     error in the same dtype (+1e-3).
  2. greedy tokens (24 per prompt) of varied-length prompts, then prompts that share a
     37-token prefix (prefix-cache hits), in each case below: how many prompts equal the
     fp32 reference for triton and for flashinfer in the same dtype (flashinfer may lose
     at most one prompt to a near-tie), and the first position where flashinfer and
     triton diverge (low precision: expected only at a near-tie of the top two logits).

Cases: CUDA graphs (block 16), eager, chunked prefill (mixed steps), block sizes 1, 5
and 256. Prints a table and one line of JSON; exits non-zero on a failure.
"""
import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from check_gpu import engine_logits, free_memory, prompts  # noqa: E402  (beside this file)
from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402

CASES = {
    "graphs": dict(),
    "eager": dict(enforce_eager=True),
    "chunked": dict(max_num_batched_tokens=32, max_num_seqs=4),
    "block1": dict(block_size=1, num_gpu_blocks=4096),
    "block5": dict(block_size=5, num_gpu_blocks=1024),
    "block256": dict(block_size=256, num_gpu_blocks=16),
}
ARCHS = {"gqa2": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128),
         "gqa4": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=128)}
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
PROMPTS = prompts([3, 9, 17, 30, 41, 77, 130, 400], 0, 500)
SHARED = prompts([37], 1, 500)[0]
PREFIX_PROMPTS = prompts([1, 5, 12], 2, 500, prefix=SHARED)


def run(path, backend, dtype, case):
    """Greedy tokens of every prompt, prefix hits, and first-step logits per prompt (None
    where a prompt would not fit one step of the case's token budget)."""
    kw = dict(device="cuda", dtype=dtype, attention_backend=backend, num_gpu_blocks=1024,
              max_model_len=512, block_size=16, max_num_seqs=16)
    llm = LLM(str(path), **{**kw, **CASES[case]})
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    outs += llm.generate(PREFIX_PROMPTS[:1], GREEDY, use_tqdm=False)   # fills the prefix cache
    outs += llm.generate(PREFIX_PROMPTS[1:], GREEDY, use_tqdm=False)   # hits it
    hits = sum(r["prefix_hit_tokens"] for r in llm.step_records)
    logits = None
    if "max_num_batched_tokens" not in CASES[case]:
        with torch.no_grad():
            logits = [engine_logits(llm.model_runner, p).float() for p in PROMPTS]
    llm.close()
    del llm
    free_memory()
    return [o.token_ids for o in outs], hits, logits


def first_divergence(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="bfloat16")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import flashinfer
    rel = lambda a, b: (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()  # noqa: E731
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as root:
        for arch, shape in ARCHS.items():
            path = write_random_checkpoint(tiny_config("qwen3", **shape), os.path.join(root, arch),
                                           dtype="float32", std=0.3, seed=0)
            ref, _, ref_logits = run(path, "triton", "float32", "graphs")
            for dtype in args.dtypes.split(","):
                for case in args.cases.split(","):
                    tri, _, tri_logits = run(path, "triton", dtype, case)
                    fi, hits, fi_logits = run(path, "flashinfer", dtype, case)
                    tri_err = fi_err = None
                    if fi_logits is not None:
                        tri_err = max(rel(t, r) for t, r in zip(tri_logits, ref_logits))
                        fi_err = max(rel(f, r) for f, r in zip(fi_logits, ref_logits))
                    tri_equal = sum(t == r for t, r in zip(tri, ref))
                    fi_equal = sum(f == r for f, r in zip(fi, ref))
                    diverge = [first_divergence(f, t) for f, t in zip(fi, tri)]
                    passed = (fi_err is None or fi_err <= 2 * tri_err + 1e-3) and fi_equal >= tri_equal - 1
                    ok &= passed
                    rows.append({"arch": arch, "dtype": dtype, "case": case,
                                 "logit_err_triton": tri_err, "logit_err_flashinfer": fi_err,
                                 "ref_equal_triton": f"{tri_equal}/{len(ref)}",
                                 "ref_equal_flashinfer": f"{fi_equal}/{len(ref)}",
                                 "fi_vs_triton_equal": f"{diverge.count(GREEDY.max_tokens)}/{len(ref)}",
                                 "first_divergence": min(diverge), "prefix_hits": hits,
                                 "pass": passed})
                    print(rows[-1], flush=True)   # partial results survive a later failure
    print(f"\ndevice: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
          f"flashinfer {getattr(flashinfer, '__version__', '?')}")
    width = {c: max(len(c), 8) for c in (rows[0] if rows else ())}
    print("  ".join(f"{c:>{w}}" for c, w in width.items()))
    for r in rows:
        print("  ".join(f"{r[c]:>{w}.2e}" if isinstance(r[c], float) else f"{str(r[c]):>{w}}"
                        for c, w in width.items()))
    result = {"bench": "check_flashinfer", "device": torch.cuda.get_device_name(),
              "flashinfer": getattr(flashinfer, "__version__", "?"), "pass": ok, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
