"""Speed of temperature sampling: the Sampler's torch path against the fused Triton kernel.

    python benchmarks/bench_sampler.py            # CUDA: S in {1, 64, 256} x vocab 151,936, bf16
    python benchmarks/bench_sampler.py --sweep    # also time the kernel's chunk sizes and rounds
    python benchmarks/bench_sampler.py --smoke    # CPU: tiny sizes under TRITON_INTERPRET=1

Every row samples at temperature 1 with no top-k/top-p (the case the fused kernel serves).
`torch_us`: Sampler(fused=False), i.e. float(), divide, exponential_, log, sub, argmax.
`fused_us`: Sampler(fused=True), i.e. building the per-row seeds/offsets plus the kernel.
`kernel_us`: sample_from_logits alone. GB/s = bytes of logits read / kernel time. Times are
triton.testing.do_bench medians (warm-up, L2 flushed before each run). Before timing, a
check: greedy rows must equal torch.argmax, and 8-token draws must follow softmax(logits / T)
(chi-square, 7 degrees of freedom: above 24.3 is a 1-in-1000 event). Ends with one line of JSON.
"""
import argparse
import json
import os
import pathlib
import sys
import time

ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ARGS.add_argument("--smoke", action="store_true", help="tiny CPU run under the Triton interpreter")
ARGS.add_argument("--sweep", action="store_true", help="time block_size x n_rounds of the kernel")
args = ARGS.parse_args()
if args.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from anywhere
from engine.kernels import sample_from_logits  # noqa: E402
from engine.sampler import Sampler, SamplingTensors  # noqa: E402

DEVICE = "cpu" if args.smoke else "cuda"
VOCAB = 1000 if args.smoke else 151_936
ROWS = (1, 4) if args.smoke else (1, 64, 256)


def measure(fn) -> float:
    """Median microseconds of fn()."""
    if DEVICE == "cpu":
        fn()  # warm
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def sampling(temperatures: torch.Tensor) -> SamplingTensors:
    S = temperatures.shape[0]
    greedy = temperatures == 0
    return SamplingTensors(temperatures, torch.full((S,), VOCAB, device=DEVICE),
                           torch.ones(S, device=DEVICE), all_greedy=bool(greedy.all()),
                           any_greedy=bool(greedy.any()), use_top_k=False, use_top_p=False,
                           seeds=[])


def check(gen) -> dict:
    """Greedy rows against torch.argmax; the draws' distribution against the softmax."""
    logits = torch.randn(8, VOCAB, generator=gen, device=DEVICE).bfloat16()
    S = logits.shape[0]
    zeros = torch.zeros(S, dtype=torch.int64, device=DEVICE)
    greedy = sample_from_logits(logits, torch.zeros(S, device=DEVICE), zeros, zeros)
    small = torch.tensor([1.2, 0.6, 0.1, -0.3, -0.8, 0.9, -1.4, 0.3], device=DEVICE)
    n = 400 if args.smoke else 1_000_000
    rows = small.expand(n, -1).contiguous()
    tokens = Sampler(torch.device(DEVICE), seed=1, fused=True)(
        rows, sampling(torch.ones(n, device=DEVICE)))
    counts = torch.bincount(tokens, minlength=8).double()
    expected = n * torch.softmax(small.double(), dim=0)
    return {"greedy_equal": bool(torch.equal(greedy, logits.argmax(-1))),
            "chi2_df7": float(((counts - expected) ** 2 / expected).sum()),
            "draws": n}


def bench(S: int, gen) -> dict:
    logits = torch.randn(S, VOCAB, generator=gen, device=DEVICE).bfloat16() * 3
    params = sampling(torch.ones(S, device=DEVICE))
    torch_sampler = Sampler(torch.device(DEVICE), seed=0)
    fused_sampler = Sampler(torch.device(DEVICE), seed=0, fused=True)
    temps = params.temperatures
    seeds = torch.full((S,), 7, dtype=torch.int64, device=DEVICE)
    offsets = torch.arange(S, device=DEVICE)
    torch_us = measure(lambda: torch_sampler(logits, params))
    fused_us = measure(lambda: fused_sampler(logits, params))
    kernel_us = measure(lambda: sample_from_logits(logits, temps, seeds, offsets))
    return {"S": S, "vocab": VOCAB, "torch_us": torch_us, "fused_us": fused_us,
            "kernel_us": kernel_us, "kernel_GBps": logits.numel() * 2 / (kernel_us * 1e-6) / 1e9,
            "speedup": torch_us / fused_us}


def sweep(gen) -> list[dict]:
    out = []
    for S in ROWS:
        logits = torch.randn(S, VOCAB, generator=gen, device=DEVICE).bfloat16()
        temps = torch.ones(S, device=DEVICE)
        seeds = torch.full((S,), 7, dtype=torch.int64, device=DEVICE)
        offsets = torch.arange(S, device=DEVICE)
        for block in (128, 256, 512, 1024, 2048):
            for rounds in (7, 10):
                us = measure(lambda: sample_from_logits(logits, temps, seeds, offsets,
                                                        block_size=block, n_rounds=rounds))
                out.append({"S": S, "block_size": block, "n_rounds": rounds, "us": us})
    return out


def main():
    gen = torch.Generator(DEVICE).manual_seed(0)
    device_name = "cpu (interpreter)" if args.smoke else torch.cuda.get_device_name()
    print(f"device: {device_name}   vocab: {VOCAB}   logits: bfloat16")
    checks = check(gen)
    print(f"check: greedy == argmax: {checks['greedy_equal']}   chi2 (df 7) of {checks['draws']} "
          f"draws: {checks['chi2_df7']:.1f} (< 24.3 expected)")
    print(f"\n{'S':>4} {'torch_us':>9} {'fused_us':>9} {'kernel_us':>9} {'GB/s':>7} {'speedup':>7}")
    results = [bench(S, gen) for S in ROWS]
    for r in results:
        print(f"{r['S']:>4} {r['torch_us']:>9.1f} {r['fused_us']:>9.1f} {r['kernel_us']:>9.1f} "
              f"{r['kernel_GBps']:>7.0f} {r['speedup']:>7.1f}")
    sweeps = sweep(gen) if args.sweep else []
    if sweeps:
        print("\nsweep (kernel only; defaults: block_size 256 below 16 rows, else 1024; "
              "n_rounds 10)")
        for r in sweeps:
            print(f"  S={r['S']:>4} block_size={r['block_size']:>5} n_rounds={r['n_rounds']:>3} "
                  f"{r['us']:>9.1f} us")
    print(json.dumps({"bench": "sampler", "device": device_name, "dtype": "bfloat16",
                      "check": checks, "results": results, "sweep": sweeps}))


if __name__ == "__main__":
    main()
