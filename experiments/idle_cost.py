"""What a step costs after the device sat idle, measured on the model's own steps: its
calibration's `idle_cost`.

    python -m experiments.calibrate --idle-cost model=qwen3-0.6b hardware=h200 [...]

(the overrides the calibration was made with). The fitted model prices a step as back to back
at the clock state the clock term tracks (simulator.clock); a device left idle also drops its
SM clock toward idle speed and lets caches and TLBs go cold, so the first step after a pause
runs longer than that (session 22: ~+0.2 ms after 50 ms of idle in the profiles; Llama-3.1-8B's
serving steps after 120-300 ms of idle +0.5-1.0 ms over their price). Here an engine of the
calibration's settings (its kernel plan pinned, its KV pool filled as the profile's was) times
SHAPES_PER_KIND profiled shapes of each step kind, spread over their price: each shape HEAT_STEPS
times back to back, then, after each idle length of IDLES_S, once more (`repeats` times,
median). Each timing is set against what the fitted model predicts for that same history (its
price and clock term over the same steps and measured gaps), so the term adds only what the
model misses:

    extra(idle) = (measured after idle - measured back to back) - (predicted after idle -
                  predicted back to back)

per step kind (simulator.clock.step_kind: "prompt" with prompt tokens, else "decode"), as
seconds ("add") or as a share of the step's price ("mul"), whichever prices the held-out
(odd) shapes better; each idle length's value is the median over the fit (even) shapes. The
calibration gets "idle_cost": {"form", "idle_s": [...], "decode": [...], "prompt": [...]} and
"idle_cost_measured" (command, commit, device, held-out errors); the timings go next to it
(<name>.idle.parquet). The simulator then adds the term to every step by the device idle
before it (simulator.clock.IdleTerm), interpolated in log idle.
"""
import json
import statistics
import time
from contextlib import closing

import numpy as np
import pandas as pd

from experiments import results
from experiments.block_cost import profiled_batches, remeasured, shape_features, spread
from experiments.calibrate import device_name, time_shape
from experiments.config import RunConfig
from simulator import CudaGraphs, FittedCostModel
from simulator.clock import Clock, IdleTerm, step_kinds
from simulator.cost_model import profiled_block_size, profiled_kv_layout

SHAPES_PER_KIND = 6
IDLES_S = (0.0005, 0.002, 0.005, 0.02, 0.05, 0.2, 0.5)
HEAT_STEPS = 3          # back-to-back steps of the shape before each idle (its clock state)


def choose_shapes(calib: dict, graphs: CudaGraphs, profile: pd.DataFrame, per_kind: int = SHAPES_PER_KIND):
    """Up to `per_kind` profiled shapes of each graph kind, evenly spread over their price:
    columns shape (list), kind, features (dict), price_s."""
    model = FittedCostModel(calib, graphs=graphs)
    shapes, features = shape_features(calib, graphs, profile)
    table = pd.DataFrame({"shape": shapes, "kind": [graphs.rows(f)[0] for f in features],
                          "features": features, "price_s": [model.predict(f) for f in features]})
    return pd.concat(spread(table, "price_s", per_kind), ignore_index=True)


def time_after_idle(runner, batch, params, repeats: int) -> list[dict]:
    """Per idle length and repeat: HEAT_STEPS launches back to back (each while the one before
    runs), a sleep, one more launch; the device seconds and device gaps of all of them."""
    rows = []
    for idle in IDLES_S:
        for r in range(repeats):
            previous, heat = None, []
            for _ in range(HEAT_STEPS):
                launched = runner.launch(batch, params, None)
                if previous is not None:
                    runner.wait(previous)
                    heat.append((previous.gap_s, previous.device_s))
                previous = launched
            runner.wait(previous)
            heat.append((previous.gap_s, previous.device_s))
            time.sleep(idle)
            launched = runner.launch(batch, params, None)
            runner.wait(launched)
            rows.append({"idle_s": idle, "repeat": r, "heat": heat, "gap_s": launched.gap_s,
                         "device_s": launched.device_s})
    return rows


def idle_rows(model: FittedCostModel, shapes: pd.DataFrame, k: int, runner, batch, params,
              repeats: int) -> list[dict]:
    """Shape k's timings (`time_after_idle`, after its back-to-back warm-up) with the fitted
    model's prediction of each history."""
    device, *_ = time_shape(runner, batch, params, repeats, runner.device.type == "cuda")
    f, rows = shapes["features"][k], []
    for row in time_after_idle(runner, batch, params, repeats):
        pred_b2b, pred_idle = predicted(model, f, row["heat"], row["gap_s"])
        rows.append({"shape_id": k, "kind": shapes["kind"][k], "shape": json.dumps(shapes["shape"][k]),
                     "prefill_tokens": f["num_prefill_tokens"], "price_s": shapes["price_s"][k],
                     "idle_s": row["idle_s"], "repeat": row["repeat"], "gap_s": row["gap_s"],
                     "device_s": row["device_s"], "b2b_s": row["heat"][-1][1],
                     "b2b_median_s": statistics.median(device), "pred_b2b_s": pred_b2b, "pred_idle_s": pred_idle})
    return rows


def predicted(model: FittedCostModel, features: dict, heat: list, gap_s: float) -> tuple[float, float]:
    """(the fitted model's time of the last back-to-back step, of the step after the idle),
    its clock term run over the same steps and gaps as measured."""
    price = model.predict(features)
    if model.clock is None:
        return price, price
    clock, t, last = Clock(model.clock), 0.0, price
    for gap, _ in heat:
        last = clock.run(t + gap, price, features)
        t += gap + last
    return last, clock.run(t + gap_s, price, features)


def extras(timings: pd.DataFrame) -> pd.DataFrame:
    """Per timing: `extra_s` (measured change from back to back less the predicted change) and
    `extra_rel` (the same over the step's price)."""
    measured = timings["device_s"] - timings["b2b_s"]
    model = timings["pred_idle_s"] - timings["pred_b2b_s"]
    return timings.assign(extra_s=measured - model, extra_rel=(measured - model) / timings["price_s"])


def fit_term(timings: pd.DataFrame, fit: np.ndarray) -> tuple[IdleTerm, dict]:
    """The term of the form that prices the held-out shapes better, and both forms' held-out
    mean |error| of the step after idle (relative to its measured time)."""
    per_shape = timings.groupby(["shape_id", "idle_s"], as_index=False).median(numeric_only=True)
    per_shape["kind"] = step_kinds(per_shape["prefill_tokens"])
    held = ~np.isin(per_shape["shape_id"], np.flatnonzero(fit))
    if not held.any():
        held = np.ones(len(per_shape), bool)
    terms, errors = {}, {}
    for form, column in (("add", "extra_s"), ("mul", "extra_rel")):
        values = {}
        for kind in ("decode", "prompt"):
            rows = per_shape[~held & (per_shape["kind"] == kind)]
            if len(rows):
                values[kind] = [float(rows[rows["idle_s"] == g][column].median()) for g in IDLES_S]
        terms[form] = IdleTerm(form, tuple(IDLES_S), values)
        pred = per_shape["pred_idle_s"] + [terms[form].extra(g, n, p) for g, n, p in zip(
            per_shape["gap_s"], per_shape["prefill_tokens"], per_shape["price_s"])]
        errors[form] = float(np.mean(np.abs(pred[held] / per_shape["device_s"][held] - 1)))
    bare = per_shape["pred_idle_s"][held] / per_shape["device_s"][held] - 1
    errors["none"] = float(np.mean(np.abs(bare)))
    best = min(("add", "mul"), key=lambda f: errors[f])
    return terms[best], errors


def measure_idle_cost(rc: RunConfig, command: str, progress=print) -> dict:
    """Measure rc's calibration's idle cost (see the module docstring), write it into the
    calibration and the timings next to it; returns the summary (also printed last).
    ValueError (one line) for a bad request."""
    out, calib, profile, rc = remeasured(rc, "--idle-cost")
    profiled = profiled_block_size(calib)
    graphs = CudaGraphs.for_calibration(calib.get("engine"))
    bare = {k: v for k, v in calib.items() if k not in ("idle_cost", "idle_cost_measured")}
    model = FittedCostModel(bare, graphs=graphs)
    shapes = choose_shapes(bare, graphs, profile)
    batches = profiled_batches(rc, calib, profiled, list(shapes["shape"]),
                               profiled_kv_layout(calib) == "contiguous")
    with closing(batches):   # the engine closes with it, on an error too
        rows = [row for k, (runner, batch, params) in enumerate(batches)
                for row in idle_rows(model, shapes, k, runner, batch, params, rc.calibrate.repeats)]
    if progress:
        progress(f"idle cost: {len(shapes)} shapes x {len(IDLES_S)} idle lengths timed")
    timings = extras(pd.DataFrame(rows))
    fit = np.arange(len(shapes)) % 2 == 0
    term, errors = fit_term(timings, fit)
    calib["idle_cost"] = term.describe()
    calib["idle_cost_measured"] = {
        "command": command, "commit": results.commit(), "device": device_name(rc), "shapes": len(shapes),
        "repeats": rc.calibrate.repeats, "heat_steps": HEAT_STEPS,
        "held_out_mean_abs_error": {k: round(v, 5) for k, v in errors.items()}}
    FittedCostModel(calib, source=str(out), graphs=graphs)   # loads back
    out.write_text(json.dumps(calib, indent=2) + "\n")
    idle_path = out.with_suffix(".idle.parquet")
    timings.to_parquet(idle_path, index=False)
    print_idle_cost(timings, term, errors)
    summary = {"calibration": str(out), "idle": str(idle_path), "shapes": len(shapes),
               "idle_cost": calib["idle_cost"], "held_out_mean_abs_error": calib["idle_cost_measured"][
                   "held_out_mean_abs_error"]}
    print(json.dumps(summary))
    return summary


def print_idle_cost(timings: pd.DataFrame, term: IdleTerm, errors: dict) -> None:
    print("\nthe step after idle, against back to back: measured change / the fitted model's change "
          "(median over the shapes of each kind, ms)")
    kinds = step_kinds(timings["prefill_tokens"])
    print(f"{'idle ms':>8}" + "".join(f"{k + ' meas':>14}{k + ' model':>14}" for k in ("decode", "prompt")))
    for g in IDLES_S:
        line = f"{1e3 * g:>8.1f}"
        for kind in ("decode", "prompt"):
            rows = timings[(timings["idle_s"] == g) & (kinds == kind)]
            meas = 1e3 * (rows["device_s"] - rows["b2b_s"]).median() if len(rows) else float("nan")
            mod = 1e3 * (rows["pred_idle_s"] - rows["pred_b2b_s"]).median() if len(rows) else float("nan")
            line += f"{meas:>14.3f}{mod:>14.3f}"
        print(line)
    print(f"\nidle_cost ({term.form}): {json.dumps(term.describe())}")
    print("held-out shapes, mean |error| of the step after idle: "
          + ", ".join(f"{k} {100 * v:.2f}%" for k, v in errors.items()))
