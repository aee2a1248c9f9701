"""Does a step shape cost the same on another engine of the same commit, and with the data
serving puts in it? The GPU probe of the twin's remaining misses (README, "Why real steps
miss the fit").

    python benchmarks/fidelity/probe_engines.py --model llama-3.1-8b --hardware h200 \\
        [--engines 2] [--batches 1,2,3,4,8,9,16,17,32,48,64] [--context 1024] \\
        [--chunks 1536,1792,6656,7168] [--repeats 5] [--calibration simulator/calibrations/<file>.json] \\
        [--set engine.skinny_gemm=false ...]

Builds the engine of the calibration's settings (conf/config.yaml, `model`, `hardware` and
`--set`, mode=gpu) `--engines` times, one after another, and in each:
- records its skinny-GEMM plan (engine.kernels.skinny_gemm: chosen at start-up by timing
  cuBLAS against the Triton kernel per layer shape and row count);
- times every probe shape back to back as the profile does (experiments.calibrate.time_shape:
  median of `--repeats` launches, each made while the previous one runs) with three kinds of
  data: `zeros` as the profile has it (all-zero token ids: every row of a prompt chunk the
  same; the KV pool as allocated, all zeros), `zeros+kv` (the same ids over a KV pool filled
  with random values), `random` (random token ids over the random KV pool), as serving has it.
Shapes: decode batches of `--batches` sequences of `--context` tokens each (the profile's
uniform decode shape; CUDA-graph sizes and sizes padded to one), and steps of `--chunks`
tokens in all: a prompt chunk beside 16 such decodes (the default sizes are the mixed graphs
whose Llama-3.1-8B real steps in session 7 departed most from the profile, +8% to -15%).

Prints per shape the milliseconds of every engine x data, the engines' spread (max - min) /
min with the profile's data, the data effect (random / zeros - 1, first engine), and with
`--calibration` the file's prediction; then every (layer shape, rows) whose plan differs
between the engines. Ends with one JSON line. On the CPU (`--set engine=cpu`, tiny model) it
runs the same code eagerly, without a plan: a check of the script, not of a GPU.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from engine import SamplingParams  # noqa: E402
from experiments.calibrate import engine_graphs, skinny_plan, time_shape  # noqa: E402
from experiments.config import build, register_configs  # noqa: E402
from experiments.replay import build_engine  # noqa: E402
from simulator.profile_grid import random_token_ids, shape_batch  # noqa: E402
from simulator.cost_model import CudaGraphs, FittedCostModel  # noqa: E402

DATA = ("zeros", "zeros+kv", "random")


def probe_shapes(batches, context, chunks, max_tokens, max_seqs) -> list[tuple[str, list]]:
    """(label, shape) of every probe step (simulator.calibrate.shape_batch entries)."""
    shapes = [(f"decode {b} x {context}", [(context, 1)] * b) for b in batches if b <= max_seqs]
    for n in chunks:      # n tokens in all: a step of exactly n rows (a mixed graph size)
        decodes = min(16, max_seqs - 1, n - 1)
        if n <= max_tokens:
            shapes.append((f"chunk {n - decodes} + {decodes} decodes",
                           [(n - decodes, n - decodes)] + [(context, 1)] * decodes))
    return shapes


def time_engine(rc, shapes, repeats: int, seed: int) -> tuple[dict, dict, CudaGraphs]:
    """Build one engine; its plan, {label: {data: device seconds}} and its CUDA graphs."""
    engine = build_engine(rc)
    try:
        graphs = engine_graphs(rc, engine)
        runner, cuda = engine.model_runner, rc.engine.device == "cuda"
        plan, params = engine.decode_plan(), SamplingParams()
        times = {label: {} for label, _ in shapes}
        for data in DATA:
            if data == "zeros+kv":       # every KV block: random values instead of zeros
                if runner.kv_cache is not None:
                    runner.kv_cache.normal_()
            for k, (label, shape) in enumerate(shapes):
                batch = shape_batch(shape, rc.cache.block_size, runner.num_blocks, plan)
                if data == "random":
                    random_token_ids(batch, engine.model_config.vocab_size, seed=seed + k)
                device = time_shape(runner, batch, [params] * len(batch.seqs), repeats, cuda)[0]
                times[label][data] = statistics.median(device)
        return skinny_plan(engine), times, graphs
    finally:
        engine.close()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="conf/model/<name>")
    ap.add_argument("--hardware", required=True, help="conf/hardware/<name>")
    ap.add_argument("--engines", type=int, default=2, help="engines built one after another")
    ap.add_argument("--batches", default="1,2,3,4,8,9,16,17,32,48,64",
                    type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--context", type=int, default=1024, help="KV tokens of every decode")
    ap.add_argument("--chunks", default="1536,1792,6656,7168", type=lambda s: [int(x) for x in s.split(",") if x])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--calibration", default=None, help="a calibration JSON: print its prediction too")
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides (engine settings)")
    args = ap.parse_args(argv)
    if args.engines < 1 or args.repeats < 1 or args.context < 2:
        sys.exit("--engines and --repeats must be >= 1, --context >= 2")
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=[f"model={args.model}", f"hardware={args.hardware}", "mode=gpu",
                                           "logger=none", "progress=false"] + args.set)
    rc = build(cfg)
    if args.context > rc.scheduler.max_model_len:
        sys.exit(f"--context {args.context} exceeds scheduler.max_model_len={rc.scheduler.max_model_len}")
    shapes = probe_shapes(args.batches, args.context, args.chunks,
                          rc.scheduler.max_num_batched_tokens, rc.scheduler.max_num_seqs)
    plans, times, started = [], [], time.perf_counter()
    for e in range(args.engines):
        plan, t, graphs = time_engine(rc, shapes, args.repeats, seed=1000 * e)
        plans.append(plan)
        times.append(t)
        print(f"[{time.perf_counter() - started:6.1f}s] engine {e + 1}/{args.engines} timed "
              f"({len(shapes)} shapes x {len(DATA)} data)", flush=True)
    predicted = {}
    if args.calibration:
        calib = json.loads(Path(args.calibration).read_text())
        model = FittedCostModel(calib, source=args.calibration,
                                graphs=CudaGraphs.for_calibration(calib.get("engine")))
        plan = model.decode_plan
        for label, shape in shapes:
            predicted[label] = model.predict(shape_batch(shape, rc.cache.block_size, 1 << 20, plan).features())
    rows = []
    print(f"\n{args.model} on {rc.hardware.name}: device ms per step, back to back, median of {args.repeats}")
    head = " ".join(f"{f'e{e + 1} {d}':>12}" for e in range(args.engines) for d in DATA)
    print(f"{'shape':<30} {'rows':>5} {head} {'engines':>8} {'data':>7}" + (f" {'file':>8}" if predicted else ""))
    for label, shape in shapes:
        kind, padded = graphs.rows(shape_batch(shape, rc.cache.block_size, 1 << 20).features())
        zeros = [t[label]["zeros"] for t in times]
        row = {"shape": label, "kind": kind, "rows": padded,
               "ms": {f"e{e + 1}": {d: round(1e3 * t[label][d], 4) for d in DATA} for e, t in enumerate(times)},
               "engines_spread": (max(zeros) - min(zeros)) / min(zeros),
               "data_effect": times[0][label]["random"] / times[0][label]["zeros"] - 1,
               "kv_effect": times[0][label]["zeros+kv"] / times[0][label]["zeros"] - 1}
        line = (f"{label:<30} {padded:>5} " + " ".join(f"{1e3 * t[label][d]:>12.3f}" for t in times for d in DATA)
                + f" {100 * row['engines_spread']:>7.1f}% {100 * row['data_effect']:>+6.1f}%")
        if predicted:
            row["file_ms"] = round(1e3 * predicted[label], 4)
            line += f" {1e3 * predicted[label]:>8.3f}"
        print(line)
        rows.append(row)
    differ = sorted({key for p in plans for key in p if any(q.get(key) != p.get(key) for q in plans)})
    print(f"\nskinny-GEMM plan entries that differ between the engines: {len(differ)} of "
          f"{len(set().union(*plans)) if plans else 0}")
    for key in differ:
        print(f"  {key}: " + " | ".join(str(p.get(key)) for p in plans))
    print(json.dumps({"probe": "engines", "model": args.model, "device": rc.engine.device,
                      "engines": args.engines, "repeats": args.repeats, "rows": rows,
                      "plan_differences": {k: [p.get(k) for p in plans] for k in differ}}))


if __name__ == "__main__":
    main()
