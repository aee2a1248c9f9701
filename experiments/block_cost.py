"""How the KV block size changes a model's attention cost, measured on the model's own steps:
its calibration's `attention_block_cost`.

    python -m experiments.calibrate --block-cost 32,64 model=llama-3.1-8b hardware=h200 [...]

(the overrides the calibration was made with). A calibration's profile ran at one block size
P (its engine.block_size); the fitted model prices a run at block size B with each attention
coefficient scaled by cost(B) / cost(P) of its kernel (FittedCostModel, ATTENTION_FEATURES).
Without this the costs are the hardware file's (`bench_attention.py --stages blocks`: the
attention kernel alone, one head layout, blocks scattered at random). Here, for P and each B,
an engine with that block size (the calibration's kernel plan pinned, its KV pool filled as
the profile's was, the blocks laid out as calibrate.block_cost_layout says) times the same
shapes of the profile, SHAPES_PER_KIND of each step kind spread over their attention share,
back to back as the profile does
(experiments.calibrate.time_shape), all on this GPU in one run, so the ratios leave out how
it differs from the profile's GPU. The fitted model at P splits each shape's price into its
decode attention's and its prefill attention's parts (c_decode, c_prefill: the price with
that kernel's attention coefficients doubled, less the price); per B the factors solve, by
least squares over the even shapes (weights 1 / t_P: relative errors),

    t_B - t_P = (f_decode - 1) c_decode + (f_prefill - 1) c_prefill,

and the odd shapes report the error of t_B priced with them against the hardware file's
(held out). A kernel no shape exercises keeps no entry. The calibration gets
"attention_block_cost": {"decode": {P: 1.0, B: f_decode, ...}, "prefill": {...}} and
"attention_block_cost_measured" (command, commit, device, errors); the timings go next to
it (<name>.blocks.parquet). The fitted model then uses that table instead of the hardware's.
"""
import dataclasses
import json
import statistics
from contextlib import closing

import numpy as np
import pandas as pd

from experiments import results
from experiments.calibrate import (device_name, existing_calibration, pool_blocks_read, time_shape,
                                   write_kv_pool, write_prefixes)
from experiments.config import RunConfig
from experiments.replay import build_engine
from simulator import CudaGraphs, FittedCostModel
from simulator.cost_model import profiled_block_size, profiled_kv_layout
from simulator.hardware import check_block_cost
from simulator.profile_grid import random_token_ids, shape_batch

KINDS = ("decode", "mixed", "eager")
# timed per step kind and block size (half fit, half held out). 16 left the prefill factor to a
# few shapes with small prefill shares: Llama-3.1-8B's block 64 read 0.915 on 16 and 0.960 on 48
# (decode 0.978 / 0.975; session 22), ~1.5 min a block size on an H200 at 48
SHAPES_PER_KIND = 48
SELECTION_BLOCKS = 1 << 20  # the pool shape_batch lays the shapes out in while choosing them


def without_block_cost(calib: dict) -> dict:
    """The calibration as fitted, without a block-cost table measured before."""
    return {k: v for k, v in calib.items() if k != "attention_block_cost"}


def attention_parts(calib: dict, graphs: CudaGraphs, features: list[dict]) -> np.ndarray:
    """[n, 3]: each step's price at the profiled block size and its decode and prefill
    attention's parts (the price with that kernel's coefficients doubled, less the price)."""
    profiled = profiled_block_size(calib)
    bare = without_block_cost(calib)
    base = FittedCostModel(bare, graphs=graphs)
    out = np.zeros((len(features), 3))
    out[:, 0] = [base.predict(f) for f in features]
    for j, kernel in enumerate(("decode", "prefill"), start=1):
        doubled = FittedCostModel({**bare, "attention_block_cost": {kernel: {profiled: 1.0, 2 * profiled: 2.0}}},
                                  graphs=graphs, block_size=2 * profiled)
        out[:, j] = [doubled.predict(f) - p for f, p in zip(features, out[:, 0])]
    return out


def shape_features(calib: dict, graphs: CudaGraphs, profile: pd.DataFrame) -> tuple[list, list[dict]]:
    """The calibration profile's shapes (lists) and their features at the profiled block size,
    blocks in order over a large pool: what a re-measurement chooses its shapes among.
    ValueError for a profile without shapes."""
    if "shape" not in profile.columns:
        raise ValueError("the calibration's profile has no shape column (profiled before session 10): "
                         "calibrate again")
    plan = FittedCostModel(without_block_cost(calib), graphs=graphs).decode_plan
    profiled = profiled_block_size(calib)
    shapes = [json.loads(s) for s in profile["shape"]]
    return shapes, [shape_batch(s, profiled, SELECTION_BLOCKS, plan, contiguous=True).features() for s in shapes]


def spread(table: pd.DataFrame, by: str, per_kind: int) -> list[pd.DataFrame]:
    """Up to `per_kind` rows of each step kind (KINDS; `table`'s kind column), evenly spread
    over the kind's rows sorted by `by`."""
    chosen = []
    for kind in KINDS:
        rows = table[table["kind"] == kind].sort_values(by, kind="stable")
        if len(rows):
            pick = np.unique(np.linspace(0, len(rows) - 1, min(per_kind, len(rows))).round().astype(int))
            chosen.append(rows.iloc[pick])
    return chosen


def choose_shapes(calib: dict, graphs: CudaGraphs, profile: pd.DataFrame,
                  per_kind: int | None = None) -> pd.DataFrame:
    """Up to `per_kind` (default SHAPES_PER_KIND) profiled shapes of each step kind, evenly
    spread over the kind's shapes sorted by their attention share (the part of the price a
    block size can move), with the columns shape (list), kind, price_s, c_decode, c_prefill."""
    shapes, features = shape_features(calib, graphs, profile)
    parts = attention_parts(calib, graphs, features)
    table = pd.DataFrame({"shape": shapes, "kind": [graphs.rows(f)[0] for f in features],
                          "price_s": parts[:, 0], "c_decode": parts[:, 1], "c_prefill": parts[:, 2]})
    table["share"] = (table["c_decode"] + table["c_prefill"]) / table["price_s"]
    chosen = spread(table[table["share"] > 0], "share", per_kind or SHAPES_PER_KIND)
    if not chosen:
        raise ValueError("no profiled shape has an attention part to measure")
    return pd.concat(chosen, ignore_index=True)


def fit_factors(t_p: np.ndarray, t_b: np.ndarray, c_decode: np.ndarray, c_prefill: np.ndarray) -> dict:
    """{kernel: factor} solving t_b - t_p = (f_decode - 1) c_decode + (f_prefill - 1) c_prefill
    by least squares in relative terms (each row over t_p); a kernel whose part is zero on
    every row is left out. Factors are kept above 0.05 (a block size cannot make attention
    free)."""
    columns = {k: c for k, c in (("decode", c_decode), ("prefill", c_prefill)) if np.any(c > 0)}
    if not columns:
        return {}
    a = np.stack([c / t_p for c in columns.values()], axis=1)
    x, *_ = np.linalg.lstsq(a, (t_b - t_p) / t_p, rcond=None)
    return {k: float(max(0.05, 1 + v)) for k, v in zip(columns, x)}


def relative_error(t_p, t_b, parts: pd.DataFrame, factors: dict) -> np.ndarray:
    """(t_b priced as t_p + (f - 1) x each kernel's part) / t_b - 1, per shape."""
    pred = t_p + (factors.get("decode", 1.0) - 1) * parts["c_decode"].to_numpy() \
        + (factors.get("prefill", 1.0) - 1) * parts["c_prefill"].to_numpy()
    return pred / t_b - 1


def block_layout(rc: RunConfig, calib: dict) -> str:
    """Where the timed shapes' KV blocks lie: calibrate.block_cost_layout, or for "profiled"
    the calibration profile's layout (scattered in profiles that did not record one)."""
    layout = rc.calibrate.block_cost_layout
    return profiled_kv_layout(calib) if layout == "profiled" else layout


def remeasured(rc: RunConfig, flag: str, hint: str = "") -> tuple:
    """(path, contents, profile, rc with the calibration's kernel plan pinned: the kernels its
    profile ran) of the calibration a re-measurement (`flag`) adds to
    (experiments.calibrate.existing_calibration). ValueError (one line, naming `flag`) when rc's
    block size is not the profiled one (`hint` ends that message) or the profile is missing."""
    out, calib = existing_calibration(rc, flag)
    profiled = profiled_block_size(calib)
    if rc.cache.block_size != profiled:
        raise ValueError(f"{flag}: {out} was profiled at block size {profiled}; give the "
                         f"calibration's settings (cache.block_size={profiled}){hint}")
    profile_path = out.with_suffix(".profile.parquet")
    if not profile_path.is_file():
        raise ValueError(f"{flag}: the calibration's profile {profile_path} is missing")
    if calib.get("kernel_plan") and rc.engine.kernel_plan is None:
        rc = dataclasses.replace(rc, engine=dataclasses.replace(rc.engine, kernel_plan=str(out)))
    return out, calib, pd.read_parquet(profile_path), rc


def profiled_batches(rc: RunConfig, calib: dict, block_size: int, shapes: list, contiguous: bool):
    """Yield (runner, batch, sampling params) for each of `shapes` (profiled shapes) on an
    engine of `rc` with KV block size `block_size`, its KV pool filled and token ids drawn as
    the calibration's profile did, the blocks in order (`contiguous`) or scattered; the engine
    is closed when the generator ends. What every re-measurement of a calibration's shapes
    (this module, experiments.idle_cost) times them on."""
    from engine import SamplingParams
    profiled = calib.get("profiled") or {}
    written = profiled.get("kv_cache_init", "zeros") == "written"
    random_ids = profiled.get("token_ids", "zero") == "random"
    rc = dataclasses.replace(rc, cache=dataclasses.replace(rc.cache, block_size=block_size))
    engine = build_engine(rc, kv_cache_init="random" if profiled.get("kv_cache_init") == "random" else "zeros")
    try:
        runner, model, plan = engine.model_runner, engine.model_config, engine.decode_plan()
        sampling = SamplingParams()
        grid = [{"shape": s} for s in shapes]
        if written:
            write_kv_pool(runner, pool_blocks_read(grid, block_size, runner.num_blocks, contiguous),
                          min(rc.scheduler.max_num_batched_tokens, rc.scheduler.max_model_len),
                          model.vocab_size, sampling, plan)
        for k, point in enumerate(grid):
            batch = shape_batch(point["shape"], block_size, runner.num_blocks, plan, contiguous=contiguous)
            if random_ids or model.is_moe:
                random_token_ids(batch, model.vocab_size, seed=k)
            if model.is_moe:
                write_prefixes(runner, batch, rc.scheduler.max_num_batched_tokens, sampling)
            yield runner, batch, [sampling] * len(batch.seqs)
    finally:
        engine.close()


def time_shapes(rc: RunConfig, calib: dict, block_size: int, shapes: pd.DataFrame, repeats: int,
                progress=print) -> list[float]:
    """Median device seconds of each shape on an engine of `rc` with KV block size
    `block_size` (`profiled_batches`), its blocks laid out as `block_layout` says."""
    times = []
    batches = profiled_batches(rc, calib, block_size, list(shapes["shape"]), block_layout(rc, calib) == "contiguous")
    with closing(batches):   # the engine closes with it, on an error too
        for runner, batch, params in batches:
            device, *_ = time_shape(runner, batch, params, repeats, runner.device.type == "cuda")
            times.append(statistics.median(device))
    if progress:
        progress(f"block size {block_size}: {len(times)} shapes timed")
    return times


def measure_block_cost(rc: RunConfig, sizes: list[int], command: str, progress=print) -> dict:
    """Measure the block costs of rc's calibration (experiments.calibrate.existing_calibration)
    for block sizes `sizes` (see the module docstring), write them into it and the timings
    next to it; returns the summary (also printed as the last line). ValueError (one line)
    for a bad request."""
    out, calib, profile, rc = remeasured(rc, "--block-cost", ", and the block sizes to measure after --block-cost")
    profiled = profiled_block_size(calib)
    sizes = sorted(set(sizes))
    if not sizes or any(b < 1 or b == profiled for b in sizes):
        raise ValueError(f"--block-cost needs block sizes >= 1 other than the profiled {profiled}, got {sizes}")
    graphs = CudaGraphs.for_calibration(calib.get("engine"))
    shapes = choose_shapes(calib, graphs, profile)
    repeats = rc.calibrate.repeats
    times = {b: np.array(time_shapes(rc, calib, b, shapes, repeats, progress)) for b in [profiled] + sizes}
    t_p = times[profiled]
    fit_rows = np.arange(len(shapes)) % 2 == 0
    held = ~fit_rows if (~fit_rows).any() else fit_rows
    tables, errors = {"decode": {profiled: 1.0}, "prefill": {profiled: 1.0}}, {}
    bare = without_block_cost(calib)
    for b in sizes:
        factors = fit_factors(t_p[fit_rows], times[b][fit_rows], shapes["c_decode"].to_numpy()[fit_rows],
                              shapes["c_prefill"].to_numpy()[fit_rows])
        for kernel, f in factors.items():
            tables[kernel][b] = round(f, 4)
        hw_factors = FittedCostModel(bare, graphs=graphs, hw=rc.hardware, block_size=b).attn_factors
        errors[b] = {name: round(float(np.mean(np.abs(relative_error(t_p, times[b], shapes, f)[held]))), 5)
                     for name, f in (("measured", factors), ("hardware", hw_factors), ("none", {}))}
    calib["attention_block_cost"] = {k: {str(b): c for b, c in t.items()} for k, t in tables.items() if len(t) > 1}
    calib["attention_block_cost_measured"] = {
        "command": command, "commit": results.commit(), "device": device_name(rc),
        "shapes": len(shapes), "repeats": repeats, "kv_layout": block_layout(rc, calib),
        "held_out_mean_abs_error": {str(b): e for b, e in errors.items()}}
    check_block_cost(calib["attention_block_cost"], str(out))
    FittedCostModel(calib, source=str(out), graphs=graphs, block_size=sizes[0])   # loads back
    out.write_text(json.dumps(calib, indent=2) + "\n")
    blocks_path = out.with_suffix(".blocks.parquet")
    timed = shapes.assign(shape=shapes["shape"].map(json.dumps),
                          **{f"device_s_block{b}": t for b, t in times.items()})
    timed.to_parquet(blocks_path, index=False)
    print_block_cost(shapes, times, profiled, calib["attention_block_cost"], errors)
    summary = {"calibration": str(out), "blocks": str(blocks_path), "shapes": len(shapes),
               "attention_block_cost": calib["attention_block_cost"],
               "held_out_mean_abs_error": {str(b): e for b, e in errors.items()}}
    print(json.dumps(summary))
    return summary


def print_block_cost(shapes, times, profiled, table, errors) -> None:
    print(f"\nstep time at each block size / at block {profiled} (median of the shapes of each kind)")
    print(f"{'kind':>8} {'shapes':>7} {'attention share':>16}" + "".join(f"{b:>9}" for b in times))
    for kind, rows in shapes.groupby("kind", sort=False):
        idx = rows.index.to_numpy()
        ratios = "".join(f"{np.median(t[idx] / times[profiled][idx]):>9.4f}" for t in times.values())
        print(f"{kind:>8} {len(rows):>7} {rows['share'].median():>16.3f}{ratios}")
    print("\nattention_block_cost (relative to block %d): %s" % (profiled, json.dumps(table)))
    print("held-out shapes, mean |error| of their time at each block size, priced from block "
          f"{profiled}'s with: the measured costs / the hardware file's / none")
    for b, e in errors.items():
        print(f"  block {b}: {100 * e['measured']:.2f}% / {100 * e['hardware']:.2f}% / {100 * e['none']:.2f}%")
