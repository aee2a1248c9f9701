"""Where a calibration misprices real steps: each step of recorded real runs priced by the
fitted model against its measured device time, grouped by what could make serving's steps
differ from the profile's, and real steps matched to profiled shapes of the same size.

    python benchmarks/fidelity/step_residuals.py --calibration simulator/calibrations/<file>.json \\
        <run dir> [<run dir> ...]

A run directory is a real run's output (run.py's, or run_fidelity.py's `real/<cell>/r<k>`:
steps.parquet, requests.parquet, summary.json). A step record holds counts, not each
sequence's context or block table, so every run is replayed on the simulator
(cost_model=replay, strict: the same steps as recorded, experiments.plan_features) and the
batches it forms, the engine's own, give them. Tables (error = (predicted - measured) /
measured, mean over steps):
- by step kind: the mean and the time-weighted error (the sum of predicted over measured);
- decode steps by CUDA-graph size next to the profile's own shapes of that size, and by
  what the profile lacks or serving adds: padding rows (graph size - decodes), the spread of
  the decodes' contexts (coefficient of variation), the KV block layout (share of a table's
  consecutive blocks that are adjacent ids: 1 contiguous, the profile's are scattered), the
  step before (decode or mixed), the device idle before the step;
- matched: profiled decode shapes and the real steps with the same graph size, decodes,
  split-KV span and splits and a total context within 3% (neither with shared blocks): measured real / measured profile
  (does the engine run serving's steps at the profile's speed?), and the fit's error on both;
- decodes sharing KV blocks (prefix-cache hits): decode steps by the share of their KV that is
  re-read (decode_context_tokens - decode_distinct_context_tokens over decode_context_tokens), and
  the saving per re-read token, measured (each shared step against the real steps of the runs
  with no shared blocks and the same graph size, decodes, span, splits, work items and a total
  context within 2%, their time moved by the fit's difference in context) next to the fit's
  (its price of the step as if unshared, less its price): give runs of a trace without sharing
  (sharegpt, azure_conv) beside the shared ones (mooncake_conv);
- mixed steps by prompt chunks in the step and the cached context before each (a burst of
  conversation turns: several prompts behind their history, which the grid profiled apart),
  next to the profile's own mixed shapes in those groups, train and held out, with decodes
  beside them or not (does the profile hold serving's mixed steps, and does the fit price them?);
- mixed steps of more than 512 prompt tokens by the tokens the engine ran in the second before
  them (the GPU clock's state), next to the profile's own (its timeline estimated from its order);
- host time from forming a step to its launch (launch_s - start_s) by step kind and by the
  requests that arrived since the previous step was formed (the engine admits them in that
  window), next to the calibration's host model.
With a clock term in the calibration (simulator.clock) every price is taken under it, along
each run's own measured device timeline, and a table by heat is added; with an idle cost
(experiments.idle_cost) each price adds it by the device idle before the step.
The last line is a JSON summary. Runs only on recorded data (no GPU); seconds per run.
"""
import argparse
import json
import math
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from experiments.plan_features import plan_features  # noqa: E402
from simulator import sim  # noqa: E402
from simulator.calibrate import with_plan_features, with_prefill_max  # noqa: E402
from simulator.clock import along_run, price_along_run  # noqa: E402
from simulator.cost_model import CudaGraphs, FittedCostModel, profiled_kv_layout  # noqa: E402


def replayed_batches(run_dir: Path, plan: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the run's steps with the plan's features, one row per step of what its batch held:
    step, cv (contexts' coefficient of variation), contiguity (adjacent block ids / pairs))."""
    shapes = []
    launch = sim.SimExecutor.launch

    def record_batch(self, batch, previous, record):     # the replay's launch: note the batch
        ctx = np.array(batch.context_lens, float)
        pairs = adjacent = 0
        for seq in batch.seqs:
            d = np.diff(seq.block_table)
            pairs, adjacent = pairs + len(d), adjacent + int((d == 1).sum())
        shapes.append({"cv": float(ctx.std() / ctx.mean()) if len(ctx) else math.nan,
                       "contiguity": adjacent / pairs if pairs else math.nan})
        return launch(self, batch, previous, record)
    with mock.patch.object(sim.SimExecutor, "launch", record_batch):
        steps = plan_features(run_dir, plan)
    steps = steps[steps["num_seqs"] > 0].reset_index(drop=True)     # (a step that only preempted: none)
    if len(shapes) != len(steps):
        raise RuntimeError(f"{len(shapes)} batches launched, {len(steps)} steps recorded")
    return steps, pd.DataFrame(shapes)


def priced(model: FittedCostModel, graphs: CudaGraphs, steps: pd.DataFrame) -> pd.DataFrame:
    rows = steps.to_dict("records")
    kind_rows = [graphs.rows(r) for r in rows]
    pred = np.array([model.predict(r) for r in rows])
    return steps.assign(kind=[k for k, _ in kind_rows], rows=[n for _, n in kind_rows], pred=pred,
                        err=(pred - steps["device_s"].to_numpy(float)) / steps["device_s"].to_numpy(float))


def with_terms(steps: pd.DataFrame, model) -> pd.DataFrame:
    """A run's priced steps (in start order) with the calibration's clock term applied along
    the run's own device timeline (its measured device times and the idle before each, as
    the fit reads the profile's) and its idle cost added (simulator.clock.price_along_run):
    `heat` (with a clock term), and `pred` / `err` under them."""
    heat, pred = price_along_run(model.clock, model.idle, steps, steps["pred"].to_numpy(float))
    steps = steps.assign(pred=pred, err=pred / steps["device_s"].to_numpy(float) - 1)
    return steps if heat is None else steps.assign(heat=heat)


def table(df: pd.DataFrame, by, title: str) -> None:
    t = df.groupby(by, observed=True)["err"].agg(n="size", mean_error="mean")
    t["mean_error"] = (100 * t["mean_error"]).round(2)
    # one group key: groups as columns; two: one row per group (a transposed two-level header
    # prints each outer label once, over the first of its columns, and reads as shifted)
    print(f"\n{title}\n" + (t.to_string() if isinstance(by, list) and len(by) > 1 else t.T.to_string()))


def chunk_groups(mixed: pd.DataFrame) -> pd.DataFrame:
    """Mixed steps with "prompt chunks" (4: 4 or more) and "cached per chunk" (the mean context
    before each chunk, binned: none, <= 512, <= 1536, more)."""
    chunks = mixed["num_seqs"] - mixed["num_decode_seqs"]
    cached = (mixed["prefill_kv_tokens"] - mixed["num_prefill_tokens"]) / chunks.clip(lower=1)
    return mixed.assign(**{"prompt chunks": chunks.clip(upper=4),
                           "cached per chunk": pd.cut(cached, [-1, 0, 512, 1536, math.inf])})


def matched(real: pd.DataFrame, profile: pd.DataFrame) -> pd.DataFrame:
    """Profiled decode shapes without shared blocks, and the real steps like them (without
    shared blocks either: a re-read costs less, reread_savings)."""
    out = []
    real = real[real["decode_distinct_context_tokens"] == real["decode_context_tokens"]]
    prof = profile[(profile["kind"] == "decode")
                   & (profile["decode_distinct_context_tokens"] == profile["decode_context_tokens"])]
    for x in prof.itertuples():
        near = real[(real["kind"] == "decode") & (real["rows"] == x.rows) & (real["num_seqs"] == x.num_seqs)
                    & ((real["decode_context_tokens"] / x.decode_context_tokens - 1).abs() < 0.03)
                    & ((real["decode_span_tokens"] - x.decode_span_tokens).abs() <= 0.05 * x.decode_span_tokens)
                    & (real["decode_split_seqs"] == x.decode_split_seqs)]
        if len(near) >= 5:
            out.append({"rows": x.rows, "decodes": x.num_seqs, "context": x.decode_context_tokens,
                        "real_steps": len(near), "real_over_profile": near["device_s"].median() / x.device_s - 1,
                        "fit_error_profile": x.err, "fit_error_real": near["err"].mean()})
    return pd.DataFrame(out)


def reread_savings(real: pd.DataFrame, model: FittedCostModel) -> pd.DataFrame:
    """Per decode step with shared blocks and unshared twins (same rows, decodes, span, splits,
    work items; total context within 2%): rows, share, and the saving per re-read token in ns,
    measured and the fit's."""
    key = ["rows", "num_seqs", "decode_span_tokens", "decode_split_seqs", "decode_work_items"]
    decode = real[real["kind"] == "decode"]
    shared = decode[decode["decode_distinct_context_tokens"] < decode["decode_context_tokens"]]
    alone = decode[decode["decode_distinct_context_tokens"] == decode["decode_context_tokens"]]
    twins = {k: (g["decode_context_tokens"].to_numpy(float), g["device_s"].to_numpy(float), g["pred"].to_numpy(float))
             for k, g in alone.groupby(key)}
    out = []
    for r in shared.to_dict("records"):
        t = twins.get(tuple(r[k] for k in key))
        if t is None:
            continue
        near = np.abs(t[0] / r["decode_context_tokens"] - 1) < 0.02
        if near.sum() < 3:
            continue
        unshared = model.predict({**r, "decode_distinct_context_tokens": r["decode_context_tokens"]})
        reread = r["decode_context_tokens"] - r["decode_distinct_context_tokens"]
        measured = np.median(t[1][near] + unshared - t[2][near]) - r["device_s"]
        out.append({"rows": r["rows"], "share": reread / r["decode_context_tokens"],
                    "measured_ns": 1e9 * measured / reread, "fit_ns": 1e9 * (unshared - r["pred"]) / reread})
    return pd.DataFrame(out)


def tokens_before(start_s: np.ndarray, tokens: np.ndarray, window_s: float = 1.0) -> np.ndarray:
    """For each step (in start order), the tokens of the steps that started in the `window_s`
    seconds before it: how hard the GPU worked just before (its clock's state: under
    sustained compute-bound work an H200 slows, probe_transitions.py)."""
    cum = np.concatenate([[0], np.cumsum(tokens)])
    first = np.searchsorted(start_s, start_s - window_s, side="left")
    return cum[np.arange(len(start_s))] - cum[first]


# the bins of tokens_before for prompt steps (the table's runs: 0-80k tokens in a second)
WARM_BINS = [-1, 2_000, 8_000, 20_000, 50_000, math.inf]


# steps the profile ran per shape: a warm-up, one from an idle device, calibrate.repeats = 3 timed
PROFILE_STEPS_PER_SHAPE = 5


def profile_tokens_before(profile: pd.DataFrame) -> np.ndarray:
    """tokens_before of each profiled shape, its timeline estimated from the profile's order:
    each shape ran PROFILE_STEPS_PER_SHAPE steps back to back."""
    runs = PROFILE_STEPS_PER_SHAPE * profile["device_s"].to_numpy(float)
    start = np.concatenate([[0.0], np.cumsum(runs)[:-1]])
    return tokens_before(start, PROFILE_STEPS_PER_SHAPE * profile["num_batched_tokens"].to_numpy(float))


def with_profile_clock(profile: pd.DataFrame, term) -> pd.DataFrame:
    """The profile's priced shapes under the calibration's clock term, its timeline estimated
    from its order (each shape PROFILE_STEPS_PER_SHAPE steps back to back, no idle between):
    `pred` / `err` the median over a shape's steps, as its measured time is. Without this the
    shapes a warm GPU ran (a clock term's slowdown) read as priced low."""
    steps = profile.loc[profile.index.repeat(PROFILE_STEPS_PER_SHAPE)].assign(gpu_gap_s=0.0)
    _, pred = along_run(term, steps, steps["pred"].to_numpy(float))
    pred = pd.Series(pred, index=steps.index).groupby(level=0).median()
    return profile.assign(pred=pred, err=pred / profile["device_s"] - 1)


def arrivals_between(steps: pd.DataFrame, requests: pd.DataFrame) -> np.ndarray:
    """Requests that arrived after the step before was formed, up to this one's forming."""
    arrival = np.sort(requests["arrival_s"].to_numpy(float))
    start = steps["start_s"].to_numpy(float)
    before = np.r_[-np.inf, start[:-1]]
    return np.searchsorted(arrival, start, side="right") - np.searchsorted(arrival, before, side="right")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="real run directories")
    ap.add_argument("--calibration", required=True, type=Path)
    ap.add_argument("--profile", type=Path, default=None,
                    help="the calibration's profile (default: <calibration>.profile.parquet)")
    args = ap.parse_args(argv)
    calib = json.loads(args.calibration.read_text())
    if not calib.get("decode_plan"):
        sys.exit(f"{args.calibration} has no decode_plan: its steps' plan features cannot be computed")
    graphs = CudaGraphs.for_calibration(calib.get("engine"))
    model = FittedCostModel(calib, source=str(args.calibration), graphs=graphs)
    profile_path = args.profile or args.calibration.with_suffix(".profile.parquet")
    runs = []
    for run_dir in args.runs:
        try:
            steps, shapes = replayed_batches(run_dir, calib["decode_plan"])
        except (ValueError, RuntimeError) as e:
            sys.exit(f"{run_dir}: {e}")
        steps = priced(model, graphs, steps).join(shapes)
        steps = with_terms(steps, model)
        steps["after"] = np.where(steps["num_prefill_tokens"].shift(1).fillna(0) > 0, "mixed", "decode")
        steps["arrived"] = arrivals_between(steps, pd.read_parquet(run_dir / "requests.parquet"))
        steps["tokens before"] = tokens_before(steps["start_s"].to_numpy(float),
                                               steps["num_batched_tokens"].to_numpy(float))
        runs.append(steps.assign(run=str(run_dir)))
    real = pd.concat(runs, ignore_index=True)
    summary = {"runs": len(runs), "steps": len(real)}
    print("by step kind: n, mean error, time-weighted error (sum predicted / sum measured - 1)")
    for kind, d in real.groupby("kind"):
        weighted = d["pred"].sum() / d["device_s"].sum() - 1
        summary[kind] = {"n": len(d), "mean_error": round(float(d["err"].mean()), 4), "weighted_error": round(float(weighted), 4)}
        print(f"  {kind:<7} n={len(d):<7} mean {100 * d['err'].mean():+.2f}%  weighted {100 * weighted:+.2f}%")
    if model.clock is not None:
        summary["clock"] = model.clock.describe()
        by_heat = real.assign(heat_bin=pd.cut(real["heat"], [-1, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, math.inf]))
        table(by_heat, ["kind", "heat_bin"], f"steps by their heat (PFLOP/s; the clock term's, tau "
              f"{1e3 * model.clock.tau_s:.0f} ms, applied to every price above and below)")
    decode = real[real["kind"] == "decode"].copy()
    table(decode, "rows", "decode steps by CUDA-graph size (rows)")
    decode["padding rows"] = (decode["rows"] - decode["num_seqs"]).clip(upper=8)
    table(decode, "padding rows", "decode steps by padding rows (graph size - decodes; 8: 8 or more)")
    decode["context cv"] = pd.cut(decode["cv"], [-0.01, 0.2, 0.4, 0.6, 0.8, 10])
    table(decode, "context cv", "decode steps by the spread of their contexts (std / mean)")
    decode["block contiguity"] = pd.cut(decode["contiguity"], [-0.01, 0.5, 0.9, 0.99, 1.0])
    table(decode, "block contiguity", "decode steps by KV block layout (adjacent block ids / pairs; "
          f"the profile's: {profiled_kv_layout(calib)})")
    table(decode, "after", "decode steps by the step before")
    decode["idle before (ms)"] = pd.cut(1e3 * decode["gpu_gap_s"], [-1, 0.01, 0.1, 1, 10, math.inf])
    table(decode, "idle before (ms)", "decode steps by device idle before them")
    decode["re-read share"] = pd.cut(1 - decode["decode_distinct_context_tokens"] / decode["decode_context_tokens"].clip(lower=1),
                                     [-0.01, 0, 0.1, 0.2, 0.3, 0.5, 1.0])
    table(decode, ["re-read share", "rows"], "decode steps by the share of their KV re-read (shared blocks) and graph size")
    savings = reread_savings(real, model)
    if len(savings):
        t = savings.groupby("rows").agg(n=("share", "size"), share=("share", "median"),
                                        measured_ns=("measured_ns", "median"), fit_ns=("fit_ns", "median"))
        print("\nsaving per re-read token of shared decode steps (median over steps with unshared twins in the "
              "runs), ns:\n" + t.round(3).T.to_string())
        summary["reread_saving_ns"] = {int(r): {"n": int(x.n), "measured": round(float(x.measured_ns), 2),
                                                "fit": round(float(x.fit_ns), 2)} for r, x in t.iterrows()}
    mixed = chunk_groups(real[real["kind"] == "mixed"])
    if len(mixed):
        table(mixed, ["prompt chunks", "cached per chunk"],
              "mixed steps by prompt chunks (4: 4 or more) and the cached context before each (tokens)")
    prompt = mixed[mixed["num_prefill_tokens"] > 512].copy() if len(mixed) else mixed
    if len(prompt):
        prompt["tokens in the second before"] = pd.cut(prompt["tokens before"], WARM_BINS)
        table(prompt, "tokens in the second before", "mixed steps of more than 512 prompt tokens by the tokens "
              "run in the second before them (a GPU warm from compute-bound work runs them slower)")
        prompt["prompt tokens"] = pd.cut(prompt["num_prefill_tokens"], [512, 1024, 2048, 4096, 8192, math.inf])
        table(prompt, ["prompt tokens", "tokens in the second before"], "... and by their prompt tokens")
        summary["prompt_steps_by_tokens_before"] = {
            str(k): {"n": len(g), "mean_error": round(float(g["err"].mean()), 4)}
            for k, g in prompt.groupby("tokens in the second before", observed=True)}
    if profile_path.is_file():
        profile = with_prefill_max(with_plan_features(pd.read_parquet(profile_path), calib))
        profile = priced(model, graphs, profile.drop(columns=["kind", "rows"]))
        if model.clock is not None:
            profile = with_profile_clock(profile, model.clock)
        heavy = (profile["kind"] == "mixed") & (profile["num_prefill_tokens"] > 512)
        if len(prompt) and heavy.any():
            heavy = profile.assign(**{"tokens in the second before": pd.cut(profile_tokens_before(profile),
                                                                            WARM_BINS)})[heavy]
            table(heavy, ["split", "tokens in the second before"], "the profile's own shapes of that kind by the "
                  f"same (estimated from its order: each shape {PROFILE_STEPS_PER_SHAPE} steps back to back)")
        shapes = chunk_groups(profile[profile["kind"] == "mixed"])
        if len(mixed) and len(shapes):   # does the profile hold the run's mixed steps, and fit them?
            shapes["with decodes"] = np.where(shapes["num_decode_seqs"] > 0, "yes", "no")
            table(shapes, ["split", "prompt chunks", "cached per chunk", "with decodes"],
                  "the profile's own mixed shapes in the same groups (train / held_out), alone or beside decodes")
        m = matched(real, profile)
        if len(m):
            print("\nreal decode steps matched to profiled shapes (same rows, decodes, span, splits; context +-3%):")
            print((m.assign(**{c: (100 * m[c]).round(2) for c in ("real_over_profile", "fit_error_profile", "fit_error_real")})
                   ).to_string(index=False))
            summary["matched"] = {"shapes": len(m), "median_real_over_profile": round(float(m["real_over_profile"].median()), 4)}
    host = real.assign(host_us=1e6 * (real["launch_s"] - real["start_s"]),
                       model_us=[1e6 * model.host.before_launch(n) for n in real["num_seqs"]])
    t = host.groupby(["kind", host["arrived"].clip(upper=2)])[["host_us", "model_us"]].agg(["size", "median"])
    print("\nhost time from forming a step to its launch, us (by step kind and requests arrived since the "
          "step before: the engine admits them in that window), measured and the calibration's host model")
    print(t.round(0).to_string())
    summary["host_us_median"] = {f"{k}/{a}": round(float(v), 1)
                                 for (k, a), v in host.groupby(["kind", host["arrived"].clip(upper=2)])["host_us"].median().items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
