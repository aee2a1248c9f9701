"""Does a step cost the same after a different step as after itself?

The calibration profile (`experiments/calibrate.py`) times every grid shape back to back after
itself. Serving runs a decode step right after a prompt step, and a prompt step after a run of
decodes. On the H200 (session 11, Llama-3.1-8B) the replayed runs' decode steps right after a
prompt step ran 3.8% over the fitted price, and their single prompt chunks beside decodes
3.0-3.5% over it, while the profile's own shapes of both kinds were priced within 0.2%. This
probe times, on the engine's runner, a decode step D (`--decodes` sequences of `--context`
tokens) and a prompt step M (a chunk of `--chunk` tokens beside `--beside` decodes) in four
orders, each step launched while the one before runs (as serving and the profile run them):

  D after D, D right after M, M after M, M after `--run` decodes

and prints each median device time next to the same step after itself, for every pair of
`--decodes` and `--chunk` values (stage `orders`). Stage `layout`: the decode step with its KV
blocks scattered over the pool (the profile's layout) and in order (a fresh pool's). Stage
`recovery`: a burst of `--burst` prompt steps back to back, device time by position (does the
clock fall under sustained compute?), then after k decode steps (`--gaps`) one more prompt
step (how fast it comes back). Stage `share`: the decode step with a `--shared`-token prefix
all its decodes share, against none, in both layouts (what a re-read token saves).

    python benchmarks/probe_transitions.py --model DIR [--kernel-plan FILE] [--decodes 8,32,128 --chunk 128,1024]
        [--stages orders,layout,recovery,share] [--burst 60 --gaps 1,4,16,64] [--shared 512]
    python benchmarks/probe_transitions.py --smoke     # tiny model on the CPU: it runs

Ends with one JSON line.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_engine import checkpoint  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from experiments.calibrate import timed_sequence  # noqa: E402
from simulator.profile_grid import serving, shape_batch  # noqa: E402


def warm(runner, batches: list) -> None:
    """One launch of each distinct batch, waited on (compilation, first replays)."""
    for batch in {id(b): b for b in batches}.values():
        runner.wait(runner.launch(batch, [SamplingParams()] * len(batch.seqs), None))


def timed_cycles(runner, cycle: list, measured: int, repeats: int) -> list[float]:
    """Run `cycle` (batches) `repeats` times in order, one step in flight ahead of the one
    waited on; returns the device seconds of position `measured` of every cycle. A warm-up
    cycle first (compilation, first replays)."""
    warm(runner, cycle)
    times = timed_sequence(runner, cycle * repeats)
    return times[measured::len(cycle)]


def recovery(runner, prompt, decode, burst: int, gaps: tuple[int, ...]) -> list[dict]:
    """The GPU clock under sustained prompt steps and after them: `burst` prompt steps back to
    back (device time by position: a compute-bound step slows as the clock falls under the
    power limit), then for each gap k in `gaps`: k decode steps, then one prompt step (how far
    the clock has come back), each after a fresh burst. Rows: what, position or gap, ms."""
    warm(runner, [prompt, decode])
    rows = []
    times = timed_sequence(runner, [prompt] * burst)
    for i, t in enumerate(times):
        rows.append({"case": "burst", "at": i + 1, "ms": 1e3 * t})
    for k in gaps:
        times = timed_sequence(runner, [prompt] * burst + [decode] * k + [prompt])
        rows.append({"case": "prompt after burst + decodes", "at": k, "ms": 1e3 * times[-1]})
        if k:
            rows.append({"case": "decode right after burst", "at": k, "ms": 1e3 * times[burst]})
    return rows


def step_batches(llm, args, decodes: int, chunk: int, contiguous: bool = False):
    """(decode step, prompt step): `decodes` decodes of serving's contexts around `--context`,
    and a `chunk`-token prompt beside `--beside` of them (default: the decode step's own
    batch, as in serving); KV blocks scattered as profiled, or in order (`contiguous`)."""
    runner, L = llm.model_runner, args.max_model_len
    beside = decodes if args.beside is None else args.beside

    def batch(shape):
        return shape_batch(shape, llm.config.block_size, runner.num_blocks, llm.decode_plan(), contiguous=contiguous)
    return batch(serving(decodes, args.context, L)), batch([(chunk, chunk)] + serving(beside, args.context, L))


def layouts(llm, args, decodes: int) -> list[dict]:
    """The decode step after itself with its KV blocks scattered over the pool (the profile's
    layout) and in order (a fresh pool's: the fidelity table's short runs are 50-99%
    contiguous); median device time of `--repeats` each."""
    rows = []
    for contiguous in (False, True):
        batch, _ = step_batches(llm, args, decodes, 1, contiguous)
        times = timed_cycles(llm.model_runner, [batch], 0, args.repeats)
        rows.append({"decodes": decodes, "layout": "contiguous" if contiguous else "scattered",
                     "median_ms": 1e3 * statistics.median(times)})
    rows[1]["vs_scattered"] = rows[1]["median_ms"] / rows[0]["median_ms"] - 1
    return rows


def shares(llm, args, decodes: int) -> list[dict]:
    """The decode step with its decodes' first `--shared` tokens one shared prefix (the same
    blocks: mooncake_conv's system block, a prefix-cache hit) against the same step with no
    sharing, in both layouts; the saving per re-read token, (D - 1) x shared of them, in ns."""
    runner, L, bs = llm.model_runner, args.max_model_len, llm.config.block_size
    shared = args.shared // bs * bs
    rows = []
    for contiguous in (False, True):
        times = {}
        for share in (False, True):
            shape = [(c, n, shared, 0) if share else (c, n) for c, n in serving(decodes, args.context, L)]
            batch = shape_batch(shape, bs, runner.num_blocks, llm.decode_plan(), contiguous=contiguous)
            times[share] = statistics.median(timed_cycles(runner, [batch], 0, args.repeats))
        reread = (decodes - 1) * shared
        rows.append({"decodes": decodes, "layout": "contiguous" if contiguous else "scattered",
                     "alone_ms": 1e3 * times[False], "shared_ms": 1e3 * times[True], "reread_tokens": reread,
                     "saving_ns": 1e9 * (times[False] - times[True]) / reread if reread else 0.0})
    return rows


def token_ids(llm, args, decodes: int, chunk: int) -> list[dict]:
    """The prompt step with the profile's token ids (all zero: every row of every layer's
    activations the same) against random ones (as serving's prompts), each `--burst` times
    back to back after a run of `--run` decode steps: device ms by position (1 = the first
    after the decodes) and the burst's median. A GPU at its power limit clocks lower for
    operands whose bits toggle."""
    from simulator.profile_grid import random_token_ids
    runner = llm.model_runner
    decode, zeros = step_batches(llm, args, decodes, chunk)
    _, random_ids = step_batches(llm, args, decodes, chunk)
    random_token_ids(random_ids, llm.model_config.vocab_size, seed=0)
    warm(runner, [decode, zeros, random_ids])
    rows = []
    for _ in range(2):
        for ids, batch in (("zero", zeros), ("random", random_ids)):
            times = timed_sequence(runner, [decode] * args.run + [batch] * args.burst)[args.run:]
            rows.append({"decodes": decodes, "chunk": chunk, "ids": ids, "first_ms": 1e3 * times[0],
                         "median_ms": 1e3 * statistics.median(times), "last_ms": 1e3 * times[-1]})
    return rows


def probe(llm, args, decodes: int, chunk: int) -> list[dict]:
    """The four orders for one (decode batch, prompt chunk) pair; the prompt step carries
    `--beside` decodes (default: the decode step's own batch, as in serving)."""
    runner = llm.model_runner
    beside = decodes if args.beside is None else args.beside
    decode, prompt = step_batches(llm, args, decodes, chunk)
    cases = [("decode", "itself", [decode, decode], 1),
             ("decode", "a prompt step", [prompt, decode], 1),
             ("prompt", "itself", [prompt, prompt], 1),
             ("prompt", f"{args.run} decodes", [decode] * args.run + [prompt], args.run)]
    rows = []
    for step, after, cycle, measured in cases:
        times = timed_cycles(runner, cycle, measured, args.repeats)
        rows.append({"decodes": decodes, "chunk": chunk, "beside": beside, "step": step,
                     "after": after, "n": len(times), "median_ms": 1e3 * statistics.median(times),
                     "spread": (max(times) - min(times)) / statistics.median(times)})
    for r in rows:
        alone = next(x for x in rows if x["step"] == r["step"] and x["after"] == "itself")
        r["vs_itself"] = r["median_ms"] / alone["median_ms"] - 1
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b", help="model dir or conf/model name")
    ap.add_argument("--kernel-plan", help="EngineConfig.kernel_plan (the calibration's, to run its kernels)")
    ap.add_argument("--decodes", default="32", help="sequences of the decode step (a comma list: each)")
    ap.add_argument("--context", type=int, default=1024, help="mean context of the decodes")
    ap.add_argument("--chunk", default="1024", help="prompt tokens of the prompt step (a comma list: each)")
    ap.add_argument("--beside", type=int, default=None,
                    help="decodes beside the prompt chunk (default: the decode step's batch)")
    ap.add_argument("--run", type=int, default=8, help="decode steps before the prompt step")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--stages", default="orders",
                    help="comma list: orders (the four orders), layout (scattered vs contiguous "
                         "KV blocks), recovery (the clock under a burst of prompt steps and after), "
                         "share (the saving per re-read token of a shared prefix, by layout), "
                         "tokens (the prompt step with all-zero token ids, as profiled, against random ones)")
    ap.add_argument("--shared", type=int, default=512, help="share: tokens of the decodes' shared prefix")
    ap.add_argument("--burst", type=int, default=60, help="recovery: prompt steps in a burst")
    ap.add_argument("--gaps", default="1,4,16,64", help="recovery: decode steps after a burst")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, small shapes")
    args = ap.parse_args(argv)
    extra = {}
    if args.smoke:
        args.model, args.decodes, args.context, args.chunk, args.beside = "tiny-qwen3", "4", 40, "24", 2
        args.run, args.repeats, args.max_model_len, args.burst = 2, 3, 256, 4
        if not torch.cuda.is_available():
            extra = dict(device="cpu", dtype="float32", num_gpu_blocks=512, attention_backend="torch")
    stages = args.stages.split(",")
    if not stages or set(stages) - {"orders", "layout", "recovery", "share", "tokens"}:
        sys.exit(f"--stages takes orders, layout, recovery, share and tokens, got {args.stages!r}")
    try:
        decodes = [int(x) for x in str(args.decodes).split(",")]
        chunks = [int(x) for x in str(args.chunk).split(",")]
        gaps = tuple(int(x) for x in str(args.gaps).split(","))
    except ValueError:
        sys.exit(f"--decodes, --chunk and --gaps take comma lists of integers, got "
                 f"{args.decodes!r}, {args.chunk!r}, {args.gaps!r}")
    if args.burst < 1 or min(gaps) < 0:
        sys.exit("--burst must be >= 1 and --gaps >= 0")
    for d in decodes:
        beside = d if args.beside is None else args.beside
        if min(decodes + chunks) < 1 or beside + 1 > 256 or d > 256:
            sys.exit("--decodes and --beside + 1 must be 1..256 (the engine's max_num_seqs), --chunk >= 1")
        if max(chunks) + beside > 8192:
            sys.exit("--chunk + --beside must be at most 8192 tokens (the step budget)")
    llm = LLM(checkpoint(args.model, "float32" if args.smoke else "bfloat16"), max_model_len=args.max_model_len,
              max_num_seqs=256, max_num_batched_tokens=8192, kernel_plan=args.kernel_plan,
              enable_prefix_caching=False, **extra)
    out = {}
    try:
        if "orders" in stages:
            out["rows"] = [r for d in decodes for c in chunks for r in probe(llm, args, d, c)]
        if "layout" in stages:
            out["layout"] = [r for d in decodes for r in layouts(llm, args, d)]
        if "share" in stages:
            out["share"] = [r for d in decodes for r in shares(llm, args, d)]
        if "recovery" in stages:
            d, c = decodes[0], max(chunks)
            decode, prompt = step_batches(llm, args, d, c)
            out["recovery"] = [dict(r, decodes=d, chunk=c)
                               for r in recovery(llm.model_runner, prompt, decode, args.burst, gaps)]
        if "tokens" in stages:
            out["tokens"] = [r for d in decodes for c in chunks for r in token_ids(llm, args, d, c)]
    finally:
        llm.close()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() and not extra else "cpu"
    print_tables(out, args, device)
    print(json.dumps({"bench": "transitions", "device": device, "model": args.model, **out}))


def print_tables(out: dict, args, device: str) -> None:
    if "tokens" in out:
        print(f"the prompt step (C prompt tokens beside D decodes) by its token ids, {args.burst} back to back "
              f"after {args.run} decodes, device ms ({args.model} on {device})")
        print(f"{'D':>4} {'C':>5} {'ids':>7} {'first':>8} {'median':>8} {'last':>8}")
        for r in out["tokens"]:
            print(f"{r['decodes']:>4} {r['chunk']:>5} {r['ids']:>7} {r['first_ms']:>8.3f} {r['median_ms']:>8.3f} {r['last_ms']:>8.3f}")
    if "rows" in out:
        print(f"step cost by the step before it, {args.model} on {device}: decode = D decodes of "
              f"~{args.context} tokens, prompt = C prompt tokens beside the same decodes; "
              f"median of {args.repeats} (device time)")
        print(f"{'D':>4} {'C':>5} {'step':>7} {'after':>16} {'n':>4} {'median ms':>10} {'spread':>7} {'vs after itself':>16}")
        for r in out["rows"]:
            print(f"{r['decodes']:>4} {r['chunk']:>5} {r['step']:>7} {r['after']:>16} {r['n']:>4} {r['median_ms']:>10.3f} "
                  f"{100 * r['spread']:>6.1f}% {100 * r['vs_itself']:>+15.1f}%")
    if "layout" in out:
        print(f"decode step by KV block layout (D decodes of ~{args.context} tokens), median of {args.repeats}")
        print(f"{'D':>4} {'layout':>11} {'median ms':>10} {'vs scattered':>13}")
        for r in out["layout"]:
            print(f"{r['decodes']:>4} {r['layout']:>11} {r['median_ms']:>10.3f} {100 * r.get('vs_scattered', 0):>+12.1f}%")
    if "share" in out:
        print(f"decode step with a {args.shared}-token shared prefix vs none (D decodes of ~{args.context} "
              f"tokens), median of {args.repeats}; saving per re-read token")
        print(f"{'D':>4} {'layout':>11} {'alone ms':>9} {'shared ms':>10} {'re-read':>8} {'saving ns':>10}")
        for r in out["share"]:
            print(f"{r['decodes']:>4} {r['layout']:>11} {r['alone_ms']:>9.3f} {r['shared_ms']:>10.3f} "
                  f"{r['reread_tokens']:>8} {r['saving_ns']:>10.2f}")
    if "recovery" in out:
        rows = out["recovery"]
        burst = [r for r in rows if r["case"] == "burst"]
        first = burst[0]["ms"]
        print(f"the clock under a burst of {len(burst)} prompt steps (C = {rows[0]['chunk']} beside "
              f"{rows[0]['decodes']} decodes) and after k decodes; device ms, vs the burst's first step")
        print(f"{'case':>30} {'at':>5} {'ms':>9} {'vs first':>9}")
        shown = [r for r in burst if r["at"] in {1, 2, 3, 5} or r["at"] % 10 == 0 or r["at"] == len(burst)]
        for r in shown + [r for r in rows if r["case"] != "burst"]:
            print(f"{r['case']:>30} {r['at']:>5} {r['ms']:>9.3f} {100 * (r['ms'] / first - 1):>+8.1f}%")


if __name__ == "__main__":
    main()
