"""GPU correctness of the engine against Hugging Face transformers (run on the GPU machine).

    python benchmarks/check_gpu.py [--backends triton,torch] [--cases streams,graphs] [--out results.json]

1. fp32, tiny random Qwen3 / Qwen2 / Llama (std 0.3, so every token depends on the whole
   context): greedy tokens must equal transformers' token for token, with CUDA graphs, prefix
   hits, chunked prefill, preemption and several block sizes.
2. bf16, Qwen3-0.6B architecture (random weights): the first-step logits of every prompt
   against transformers run in fp32 on the same weights, as ||ours - ref|| / ||ref||, next to
   the same error of transformers itself in bf16. Tolerance: ours may be at most 2x
   transformers' own bf16 error (both round activations to bf16 at different points, so
   neither is exact; matching its error level is the bar). Greedy tokens are then compared
   to transformers' bf16 greedy up to the first divergence, which in bf16 is expected only
   at a near-tie of the top two logits.
flashinfer has no fp32 kernels: it takes part in check 2 only (benchmarks/check_flashinfer.py
compares it with triton over the cases of check 1, in bf16).
Prints a table and one line of JSON; exits non-zero on a failure.
"""
import argparse
import gc
import json
import os
import random
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402
from engine.step_inputs import EAGER  # noqa: E402
from policy import Batch, Sequence  # noqa: E402


def prompts(lengths, seed, vocab, prefix=()):
    rng = random.Random(seed)
    return [list(prefix) + [rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def hf_model(path, dtype):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
    model.generation_config.eos_token_id = None
    return model


@torch.no_grad()
def hf_greedy(model, ps, max_tokens):
    outs = []
    for p in ps:
        ids = model.generate(torch.tensor([p], device="cuda"), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=0)
        outs.append(ids[0, len(p):].tolist())
    return outs


def free_memory():
    """Return cached blocks to the driver: the next engine sizes its KV pool from free memory."""
    gc.collect()
    torch.cuda.empty_cache()


@torch.no_grad()
def engine_logits(runner, prompt):
    """Last-position logits of one prompt through the engine's own step path (packing,
    paged KV store, attention backend) on distinct blocks 1..n of the pool."""
    seq = Sequence("probe", prompt, 1)
    seq.block_table = list(range(1, 1 + -(-len(prompt) // runner.config.block_size)))
    batch = Batch(seqs=[seq], num_new_tokens=[len(prompt)], num_computed_tokens=[0], sample=[True],
                  num_batched_tokens=len(prompt), num_prefill_tokens=len(prompt))
    step = runner.packer.pack(batch, None, graph=(EAGER, 0))   # the call below runs no graph
    runner.buffer.upload(step.nbytes)
    views = runner.buffer.views(step.T, step.B, step.W, step.P, step.D, step.S)[2]
    hidden = runner.model(*runner.model_inputs(step, views))
    return runner.model.compute_logits(hidden[step.num_tokens - 1:step.num_tokens])[0]


def fp32_checks(root, backends, only=None):
    rows, ok = [], True
    ps = prompts([3, 9, 17, 30, 41, 77, 130], 0, 500)
    shared = prompts([37], 1, 500)[0]
    ps_prefix = prompts([1, 5, 12], 2, 500, prefix=shared)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    cases = {
        "graphs": dict(),                               # decode and mixed-step graphs
        "streams": dict(attention_streams=True, max_num_batched_tokens=64),  # mixed steps' two attention streams
        "decode-graphs": dict(cuda_graph_max_tokens=16),  # larger mixed steps eager
        "eager": dict(enforce_eager=True),
        "chunked": dict(max_num_batched_tokens=32, max_num_seqs=4),
        "prefill_first": dict(scheduler_policy="prefill_first", max_num_batched_tokens=64),
        "preempt": dict(num_gpu_blocks=24, block_size=8, max_model_len=192),
        "block1": dict(block_size=1, num_gpu_blocks=4096),
        "block32": dict(block_size=32, num_gpu_blocks=128),
        "block256": dict(block_size=256, num_gpu_blocks=16),
    }
    if only and only - set(cases):
        raise SystemExit(f"check_gpu: unknown case(s) {sorted(only - set(cases))} (known: {', '.join(cases)})")
    for arch in ("qwen3", "qwen2", "llama"):
        path = write_random_checkpoint(tiny_config(arch), os.path.join(root, arch), dtype="float32", std=0.3)
        ref_model = hf_model(path, torch.float32)
        ref = hf_greedy(ref_model, ps + ps_prefix, 24)
        del ref_model
        free_memory()
        for backend in backends:
            if backend == "flashinfer":   # no fp32 kernels: benchmarks/check_flashinfer.py covers these cases
                continue
            for name, kw in cases.items():
                if (arch != "qwen3" and name not in ("graphs", "chunked")) or (only and name not in only):
                    continue
                base = dict(device="cuda", dtype="float32", attention_backend=backend,
                            num_gpu_blocks=1024, max_model_len=512, block_size=16, max_num_seqs=16)
                if backend == "torch":
                    base["enforce_eager"] = True   # the torch reference reads lengths on the host
                rows.append({"check": "fp32-greedy", "arch": arch, "backend": backend, "case": name,
                             **greedy_case(path, {**base, **kw}, ps, ps_prefix, ref, greedy)})
                ok &= rows[-1]["pass"]
                print(rows[-1], flush=True)   # partial results survive a later failure
    return rows, ok


def greedy_case(path, engine_kwargs, ps, ps_prefix, ref, greedy) -> dict:
    """One engine on `ps`, then on the prefix-sharing prompts in two calls (the second hits
    the first's cache): how many outputs equal `ref`, prefix hits, preemptions, pass."""
    llm = LLM(str(path), **engine_kwargs)
    outs = llm.generate(ps, greedy, use_tqdm=False)
    outs += llm.generate(ps_prefix[:1], greedy, use_tqdm=False)
    outs += llm.generate(ps_prefix[1:], greedy, use_tqdm=False)
    equal = sum(o.token_ids == r for o, r in zip(outs, ref))
    row = {"equal": f"{equal}/{len(ref)}",
           "prefix_hits": sum(r["prefix_hit_tokens"] for r in llm.step_records),
           "preempted": sum(r["num_preempted"] for r in llm.step_records),
           "pass": equal == len(ref)}
    llm.close()
    del llm
    free_memory()
    return row


@torch.no_grad()
def bf16_checks(root, backends):
    rows, ok = [], True
    path = write_random_checkpoint("qwen3-0.6b", os.path.join(root, "q06"), dtype="bfloat16", seed=0)
    ps = prompts([5, 60, 300, 900], 3, 150_000)
    ref32 = hf_model(path, torch.float32)
    ref_logits = [ref32(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in ps]
    del ref32
    hf16 = hf_model(path, torch.bfloat16)
    hf_logits = [hf16(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in ps]
    hf_tokens = hf_greedy(hf16, ps, 32)
    del hf16
    free_memory()
    rel = lambda a, b: (torch.linalg.norm(a - b) / torch.linalg.norm(b)).item()  # noqa: E731
    hf_err = max(rel(h, r) for h, r in zip(hf_logits, ref_logits))
    for backend in backends:
        llm = LLM(str(path), device="cuda", dtype="bfloat16", attention_backend=backend,
                  max_model_len=2048, gpu_memory_utilization=0.8, enforce_eager=backend == "torch")
        runner = llm.model_runner
        errs = []
        for p, r in zip(ps, ref_logits):   # first-step logits through the engine's own path
            errs.append(rel(engine_logits(runner, p).float(), r))
        outs = llm.generate(ps, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
        agree = [next((i for i, (a, b) in enumerate(zip(o.token_ids, h)) if a != b), len(h))
                 for o, h in zip(outs, hf_tokens)]
        err = max(errs)
        passed = err <= 2 * hf_err and min(agree) > 0
        ok &= passed
        rows.append({"check": "bf16-qwen3-0.6b", "backend": backend,
                     "logit_rel_err_vs_fp32": err, "hf_bf16_rel_err_vs_fp32": hf_err,
                     "greedy_tokens_agreeing_with_hf_bf16": agree, "pass": passed})
        print(rows[-1], flush=True)
        llm.close()
        del llm, runner
        free_memory()
    return rows, ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="triton,torch")
    ap.add_argument("--cases", default="", help="only these fp32 cases (comma-separated names of "
                    "fp32_checks' cases), and no bf16 check: a quick re-check of one engine option")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    backends = args.backends.split(",")
    only = set(filter(None, args.cases.split(",")))
    with tempfile.TemporaryDirectory() as root:
        rows32, ok32 = fp32_checks(root, backends, only)
        rows16, ok16 = bf16_checks(root, backends) if not only else ([], True)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    for r in rows32 + rows16:
        print("  ".join(f"{k}={v}" for k, v in r.items()))
    result = {"bench": "check_gpu", "device": torch.cuda.get_device_name(), "pass": ok32 and ok16,
              "rows": rows32 + rows16}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
