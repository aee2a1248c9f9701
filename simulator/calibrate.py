"""Fit the simulator's step costs on a profile of the engine: the `fitted` cost model's
calibration file and the roofline's hardware parameters (efficiencies and overheads).

A profile is a table, one row per measured step shape (written by `python -m
experiments.calibrate`, which runs the engine; kept next to the calibration as
<name>.profile.parquet): the `Batch.features()` columns, `kind` and `rows` (how the engine
ran it: policy.cuda_graphs.graph_rows), `device_s` (the step's device time, median of the
repeats), `host_launch_s` / `host_receive_s` (host time before the launch and after the
tokens arrived), and `split` ("train" or "held_out": the held-out shapes are never fitted
on, and the error reported per step kind is theirs), and `shape` (the grid point, JSON, so a
feature added later can be computed for it: `with_plan_features`; profiles made before it
was kept got it back with `python -m simulator.calibrations.recover_shapes`).

Re-fit a saved profile (no GPU needed):

    python -m simulator.calibrate simulator/calibrations/<name>.profile.parquet --out <name>.json \\
        [--hardware conf/hardware/h200.yaml --hardware-out conf/hardware/h200-fitted.yaml]
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import sys

import numpy as np
import pandas as pd
import yaml

from simulator.cost_model import (CACHED_PAIRS_FEATURE, CALIBRATION_FORMAT, CAUSAL_FEATURE, FITTED_FEATURES,
                                  MOE_FEATURE, OTHER_CACHED_FEATURE, PLAN_FEATURES, PREFILL_MAX_FEATURE, PREFILL_SPAN_FEATURE,
                                  STEP_KINDS, TAPER_FEATURE,
                                  CudaGraphs, FittedCostModel, ModelSpec, REPO_ROOT, TIE_MAPE, _fit_base,
                                  fit_kind, moe_experts_touched, nonnegative_lstsq, prefill_cached_pairs,
                                  prefill_causal_pairs, prefill_other_cached_tokens, prefill_span_tokens,
                                  profiled_block_size,
                                  step_experts_touched, decode_reread_share_tokens, reread_saving)
from policy.decode_plan import DecodePlan
from simulator.clock import ClockTerm, flops_per_unit, heat_along, price_along_run, slowdowns, step_kinds
from simulator.profile_grid import is_decode_entry, shape_batch
from simulator.hardware import SERVING_HOST_TERMS, HardwareSpec

# Features a profile made by an older grid may lack (fitted without them, said so), and
# that each step kind's fit tries in and out (kept where shapes not fitted on say so: with the
# balanced split-KV decode kernel the longest context no longer sets a decode step's tail).
# decode_distinct_context_tokens is fitted only for a step kind whose train shapes include
# decodes sharing KV blocks (otherwise it equals decode_context_tokens: nothing to learn).
# decode_span_tokens, decode_split_seqs and decode_work_items (PLAN_FEATURES) need the profiled engine's split-KV
# plan (meta "decode_plan"); a profile made before one was recorded gets it from its rows'
# shapes where it has them (with_plan_features).
OPTIONAL_FEATURES = ("max_context_tokens", "decode_distinct_context_tokens", "decode_span_tokens",
                     "decode_split_seqs", "decode_work_items", CAUSAL_FEATURE, TAPER_FEATURE,
                     CACHED_PAIRS_FEATURE, PREFILL_SPAN_FEATURE, OTHER_CACHED_FEATURE)
SHARED_FEATURE = "decode_distinct_context_tokens"
# Features whose coefficient each step kind's fit also tries piecewise linear in the step's
# rows (kept where the held-out shapes say so): on the H200, decode attention's cost per
# context token is not the same at every batch size (serving steps of 16-64 decodes ran
# 5-7% over a single slope fitted on the profile), nor is its cost per token of the split-KV
# plan's longest chain (Qwen3-0.6B's profile, fitted per batch size: 0.07 us per span token
# at 8-16 decodes, 0.5-0.8 us at 32-256, where the plan's shares run in a second wave).
SLOPED_FEATURES = ("decode_context_tokens", "decode_span_tokens")


def shares_kv(steps: pd.DataFrame) -> pd.Series:
    """Which steps have decodes sharing KV blocks (False for all of a table made before
    `decode_distinct_context_tokens` was recorded)."""
    if SHARED_FEATURE not in steps.columns:
        return pd.Series(False, index=steps.index)
    return steps[SHARED_FEATURE] < steps["decode_context_tokens"]


def with_shared_feature(steps: pd.DataFrame, source: str) -> pd.DataFrame:
    """`steps` with `decode_distinct_context_tokens`: as recorded, or, for a table made
    before it was, equal to decode_context_tokens (no sharing known; said so)."""
    if SHARED_FEATURE in steps.columns:
        return steps
    print(f"note: {source} has no {SHARED_FEATURE} (recorded before it was): taken as "
          "decode_context_tokens (no decodes sharing KV blocks)")
    return steps.assign(**{SHARED_FEATURE: steps["decode_context_tokens"]})


def with_causal_pairs(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with the features the fitted model computes from the others: CAUSAL_FEATURE
    (cost_model.prefill_causal_pairs of every row), CACHED_PAIRS_FEATURE (the other pairs) and
    TAPER_FEATURE (decode_reread_share_tokens) and OTHER_CACHED_FEATURE."""
    # the model's own rules (column arithmetic works on a table as on a step's features); a
    # table made before SHARED_FEATURE was recorded shares nothing
    taper = decode_reread_share_tokens(table) if SHARED_FEATURE in table.columns else 0.0
    return table.assign(**{CAUSAL_FEATURE: prefill_causal_pairs(table), CACHED_PAIRS_FEATURE: prefill_cached_pairs(table),
                           TAPER_FEATURE: taper,
                           OTHER_CACHED_FEATURE: prefill_other_cached_tokens(table)})


def with_plan_features(profile: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """`profile` with the PLAN_FEATURES it lacks, computed from each row's `shape` (the grid
    point it ran, JSON: experiments.calibrate records it) under the metadata's decode_plan
    with the profiled engine's decode graphs, through `shape_batch(...).features()`, as the
    profile's own columns were; the profile as it is without a `shape` column (the fit
    then goes without them, said so). Raises ValueError if a recomputed feature the
    profile has differs from it (the shapes or the plan are not the profiled ones)."""
    missing = [f for f in PLAN_FEATURES if f not in profile.columns]
    if not missing or "shape" not in profile.columns:
        return profile
    e = meta.get("engine") or {}
    graphs = CudaGraphs.for_calibration(e)
    plan = DecodePlan(decode_graph_sizes=tuple(graphs.decode), **meta["decode_plan"])
    computed = pd.DataFrame([shape_batch(json.loads(shape), profiled_block_size(meta), 1 << 20, plan).features()
                             for shape in profile["shape"]], index=profile.index)
    for f in set(PLAN_FEATURES) - set(missing):
        if not (computed[f] == profile[f]).all():
            raise ValueError(f"the profile's {f} differs from its shapes' under the metadata's "
                             "decode_plan: not the plan (or the shapes) it was profiled with")
    print(f"note: {', '.join(missing)} computed from the profile's shapes (recorded before they were)")
    return profile.assign(**{f: computed[f] for f in missing})


def host_columns(steps: pd.DataFrame) -> np.ndarray:
    """Each step's host-cost regressors, in HostCosts' launch order: 1, its sequences, its
    prompt tokens, whether it carries a prompt chunk (the receive takes the first two)."""
    prompt = steps["num_prefill_tokens"].to_numpy(float)
    return np.column_stack([np.ones(len(steps)), steps["num_seqs"].to_numpy(float), prompt,
                            (prompt > 0).astype(float)])


def fit_host(profile: pd.DataFrame) -> dict:
    """Host costs of the step loop (non-negative least squares): the launch fixed + per
    sequence + per prompt token (packing a chunk is per token) + per step with a prompt chunk
    (the prefill path's own work), the receive fixed + per sequence."""
    X = host_columns(profile)
    launch = nonnegative_lstsq(X, profile["host_launch_s"].to_numpy(float))
    receive = nonnegative_lstsq(X[:, :2], profile["host_receive_s"].to_numpy(float))
    return {"launch_s": float(launch[0]), "launch_seq_s": float(launch[1]), "launch_token_s": float(launch[2]),
            "launch_prompt_s": float(launch[3]),
            "receive_s": float(receive[0]), "receive_seq_s": float(receive[1])}


# The host window from forming a step to its launch in the engine's own step loop
# (fit_serving_host; the terms, simulator.hardware.SERVING_HOST_TERMS, are what
# `cost_model.host_window=serving` charges). The profile times the runner's launch and the
# policy's decode scheduling alone; serving's window also holds the admission of the requests
# that arrived since the step before (the engine's add_request, after the clock is polled the
# step is formed at), a new prompt's first scheduling and the loop's own work. Measured on the
# H200 (Qwen3-0.6B, session 10's azure_conv runs at 0.3 x capacity): a decode step's window
# 270-292 us (median) against 188 us from the profile's terms, a step with a prompt chunk and
# its admission 690-940 us against ~460 us.


def fit_serving_host(steps: pd.DataFrame) -> dict:
    """SERVING_HOST_TERMS (seconds, non-negative least squares) and `n` (steps fitted) from the
    step records of a run of the engine's step loop (experiments.calibrate.serving_host), with
    `admitted` / `admitted_tokens` (requests and prompt tokens added in the turn that formed
    the step) and `admit_time_s` (the host time those add_request calls took). The admission
    terms are fitted on the timed calls of the turns that admitted; the launch terms
    (simulator.calibrate.host_columns: fixed, per sequence, per prompt token, per step with
    a prompt chunk) on the rest of each window, launch_s - start_s - admit_time_s, so the two
    never trade off against each other. Steps that only preempted are left out, and so is a
    window more than 10 median absolute residuals off the first fit (a pause of the host:
    the mean should be the steps', not one collector run's). Raises ValueError for a run
    without those columns or without an admission."""
    missing = {"admitted", "admitted_tokens", "admit_time_s"} - set(steps.columns)
    if missing:
        raise ValueError(f"serving-host steps lack {sorted(missing)} (recorded by "
                         "experiments.calibrate.serving_host)")
    steps = steps[steps["num_seqs"] > 0]
    admitting = steps[steps["admitted"] > 0]
    if admitting.empty:
        raise ValueError("serving-host steps admit no request: the admission terms cannot be fitted")

    def fit(X, y):      # least squares, again without the outliers of the first fit
        coef = nonnegative_lstsq(X, y)
        residual = np.abs(y - X @ coef)
        keep = residual <= 10 * max(np.median(residual), 1e-6)
        return (nonnegative_lstsq(X[keep], y[keep]) if not keep.all() else coef), int(keep.sum())

    admit, _ = fit(admitting[["admitted", "admitted_tokens"]].to_numpy(float),
                   admitting["admit_time_s"].to_numpy(float))
    window = (steps["launch_s"] - steps["start_s"] - steps["admit_time_s"]).to_numpy(float)
    launch, n = fit(host_columns(steps), window)
    terms = {"launch_s": launch[0], "launch_seq_s": launch[1], "launch_token_s": launch[2],
             "launch_prompt_s": launch[3], "admit_s": admit[0], "admit_token_s": admit[1]}
    return {**{name: float(terms[name]) for name in SERVING_HOST_TERMS}, "n": n}


# The clock term's candidate time constants (s): the H200's SM clock falls within a step or
# two of a burst of prompt steps and is back within tens of milliseconds of decodes.
CLOCK_TAUS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3)
# The timings the clock term is fitted on: each shape back to back, right after light decodes
# and right after heavy prompt steps. Not `cold`: after 50 ms of idle the SM clock ramps up
# from its idle speed, which the heat does not describe (cold decodes run 2% slower).
CLOCK_PHASES = ("back_to_back", "cool", "hot")
# The term is kept only if it predicts at least this many held-out cool and hot timings with at
# most this share of the error of pricing them as back to back (noise alone fits a small term).
CLOCK_MIN_HELD_OUT = 10
CLOCK_GAIN = 0.9


def clock_rows(profile: pd.DataFrame, timeline: pd.DataFrame, term: ClockTerm) -> pd.DataFrame:
    """The timeline's timed launches of each shape's own batch in CLOCK_PHASES (back to back
    without its warm-up and idle launch), with the heat each ran at (`heat_along` the whole
    timeline), its kind ("decode" / "prompt") and its shape's split."""
    heat = heat_along(np.asarray(term.step_flops(timeline), float), timeline["device_s"].to_numpy(float),
                      timeline["gap_s"].to_numpy(float), term.tau_s)
    rows = timeline.assign(heat=heat)
    rows = rows[rows["own"] & rows["phase"].isin(CLOCK_PHASES) & (rows["shape"] >= 0)]
    first = rows.groupby(["shape", "phase"]).cumcount()
    rows = rows[(rows["phase"] != "back_to_back") | (first >= 2)]
    return rows.assign(kind=step_kinds(rows["num_prefill_tokens"]),
                       split=profile["split"].to_numpy()[rows["shape"].to_numpy()],
                       log_s=np.log(rows["device_s"].to_numpy(float)))


def _within_shape(rows: pd.DataFrame, column: str) -> pd.Series:
    return rows[column] - rows.groupby("shape")[column].transform("mean")


def fit_clock(profile: pd.DataFrame, timeline: pd.DataFrame, flops: dict) -> tuple[dict | None, np.ndarray]:
    """The clock term (simulator.clock) fitted on the profile's launch timeline: for each
    time constant of CLOCK_TAUS, per kind the slowdown that best explains, within each train
    shape timed more than one way (back to back, cool, hot), its log device time by its
    heat; the constant with the lowest error. Held out: each held-out shape's cool and hot
    timings predicted from its back-to-back one, with the term and without. Returns (the
    calibration's "clock" section, or None where the timeline holds no such shape or the
    term does not predict CLOCK_MIN_HELD_OUT or more held-out timings with at most CLOCK_GAIN
    of the error without it; and the mean heat of each
    profile row's back-to-back timings, to turn its device_s into a base-clock time)."""
    best = None
    for tau in CLOCK_TAUS:
        timed = clock_rows(profile, timeline, ClockTerm(tau, {}, flops))
        rows = timed[timed.groupby("shape")["phase"].transform("nunique") > 1]
        train = rows[rows["split"] == "train"]
        if train.empty:
            return None, np.full(len(profile), np.nan)
        slowdown, sse = {}, 0.0
        for kind, g in train.groupby("kind"):
            x, y = _within_shape(g, "heat"), _within_shape(g, "log_s")
            k = max(0.0, float((x * y).sum() / (x * x).sum())) if (x * x).sum() > 0 else 0.0
            slowdown[kind] = k
            sse += float(((y - k * x) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, tau, slowdown, rows, timed)
    _, tau, slowdown, rows, timed = best
    slowdown = {kind: round(slowdown.get(kind, 0.0), 4) for kind in ("decode", "prompt")}
    held = rows[rows["split"] != "train"]
    base = held[held["phase"] == "back_to_back"].groupby("shape")[["device_s", "heat"]].median()
    other = held[held["phase"] != "back_to_back"].merge(base, left_on="shape", right_index=True,
                                                         suffixes=("", "_b2b")).dropna()
    if other.empty:
        return None, np.full(len(profile), np.nan)
    k = other["kind"].map(slowdown).to_numpy(float)
    with_term = other["device_s_b2b"] * (1 + k * other["heat"]) / (1 + k * other["heat_b2b"])
    mape = float((with_term / other["device_s"] - 1).abs().mean())
    mape_without = float((other["device_s_b2b"] / other["device_s"] - 1).abs().mean())
    heat = (timed[timed["phase"] == "back_to_back"].groupby("shape")["heat"].mean()
            .reindex(range(len(profile))).to_numpy(float))
    if len(other) < CLOCK_MIN_HELD_OUT or mape > CLOCK_GAIN * mape_without:
        return None, heat
    return ({"tau_s": tau, "slowdown": slowdown, "flops": {k: float(v) for k, v in flops.items()},
             "fitted_on": {"shapes": int(rows["shape"].nunique()), "timings": len(rows),
                           "phases": list(CLOCK_PHASES)},
             "held_out": {"n": len(other), "mape": round(mape, 4), "mape_without": round(mape_without, 4)}},
            heat)


def model_flops(meta: dict) -> dict | None:
    """flops_per_unit of the calibration's model (conf/model/<model>.yaml) and tp; None if
    the repository has no such model file."""
    path = REPO_ROOT / "conf" / "model" / f"{meta.get('model')}.yaml"
    if not path.is_file():
        return None
    cfg = yaml.safe_load(path.read_text())
    return flops_per_unit(ModelSpec.from_hf_config(cfg["hf_config"], name=cfg.get("name")), int(meta.get("tp", 1)))


def fit_calibration(profile: pd.DataFrame, meta: dict, timeline: pd.DataFrame | None = None,
                    flops: dict | None = None) -> dict:
    """A calibration dict (see `FittedCostModel`) fitted on a profile. `meta` supplies
    model, device, command and optionally tp, engine_commit, engine (settings), decode_plan
    (`DecodePlan.describe()`: the engine's split-KV plan, which the profile's
    decode_span_tokens was computed with; without it that feature is not fitted). With the
    profile's launch `timeline` and the model's `flops` (flops_per_unit), the clock term is
    fitted first (fit_clock) and the kinds on base-clock times (each shape's back-to-back
    time over 1 + slowdown x its heat). Raises ValueError if columns are missing or the
    eager kind was not profiled."""
    for key in ("model", "device", "command"):
        if not meta.get(key):
            raise ValueError(f"calibration metadata needs {key!r}")
    needed = {"kind", "rows", "split", "device_s", "num_seqs", "host_launch_s", "host_receive_s"}
    needed |= {f for fs in FITTED_FEATURES.values() for f in fs if f not in OPTIONAL_FEATURES}
    missing = sorted(needed - set(profile.columns))
    if missing:
        raise ValueError(f"profile lacks columns {missing}")
    plan = meta.get("decode_plan")
    if plan:
        profile = with_plan_features(profile, meta)
    profile = with_causal_pairs(with_prefill_max(profile))     # computed from the columns and shapes
    absent = [f for f in OPTIONAL_FEATURES if f not in profile.columns and f != PREFILL_SPAN_FEATURE]   # (computed: fit_prefill_span)
    if absent:
        print(f"note: the profile has no {absent} (made before they were recorded): fitted without")
    planned = [f for f in PLAN_FEATURES if f in profile.columns]
    if planned and not plan:
        print(f"note: no decode_plan in the metadata (the engine's split-KV plan): fitted without {', '.join(planned)}")
        profile = profile.drop(columns=planned)
    if (profile["device_s"] <= 0).any():
        raise ValueError("profile has device times <= 0")
    clock = None
    if timeline is not None and flops:
        clock, heat = fit_clock(profile, timeline, flops)
        if clock:
            slow = slowdowns(clock["slowdown"], profile["num_prefill_tokens"])
            profile = profile.assign(device_s=profile["device_s"] / (1 + slow * np.nan_to_num(heat)))
    moe = moe_section(profile, meta)
    reread = reread_curve(profile)
    if reread:      # the kinds fitted on every step as if unshared (cost_model.reread_saving)
        profile = with_causal_pairs(unshared(profile, reread))
    kinds = fit_kinds(profile, STEP_KINDS, note=not reread)
    if not kinds:
        raise ValueError("the profile has no train rows to fit")
    kinds, span = fit_prefill_span(profile, kinds)
    if span:    # (the chunk routing below re-fits the mixed kind: with the span it keeps)
        profile = profile.assign(**{PREFILL_SPAN_FEATURE: span_column(profile, span["pairs_per_key"])})
    if moe:
        kinds, moe["moe"] = fit_chunk_routing(profile, kinds, moe["moe"])
    return {"format": CALIBRATION_FORMAT, "model": meta["model"], "device": meta["device"],
            "tp": int(meta.get("tp", 1)), "engine_commit": meta.get("engine_commit"),
            "command": meta["command"], "created": datetime.date.today().isoformat(),
            "engine": meta.get("engine", {}), "kinds": kinds, "host": fit_host(profile),
            **({"decode_plan": dict(plan)} if planned and plan else {}),
            **({"prefill_span": span} if span else {}), **({"reread": reread} if reread else {}), **moe,
            **({"clock": clock} if clock else {})}


# Re-read shares bounding the bins of the profile's twin pairs (reread_curve): the grid's
# shared decode shapes re-read a system prompt under serving contexts (10-30% of their KV) or a
# conversation's history (1/2 to 7/8).
REREAD_SHARE_BINS = (0.0, 0.2, 0.35, 0.6, 1.0)
REREAD_MIN_PAIRS = 3    # a bin's saving is the median of at least this many pairs


def twin_pairs(profile: pd.DataFrame) -> pd.DataFrame:
    """The profile's decode shapes that are twins: the same contexts (`shape` equal but for the
    shares), one whose decodes share KV blocks, the other nothing. One row per shared shape
    with an unshared twin: rows, share (re-read tokens R / its KV tokens), mean_context,
    saving_s (the twin's device time less its own, per re-read token), split. Empty without
    `shape` (a profile made before it was recorded) or twins."""
    cols = ["rows", "share", "mean_context", "saving_s", "split"]
    if "shape" not in profile.columns or SHARED_FEATURE not in profile.columns:
        return pd.DataFrame(columns=cols)
    decode = profile[profile["kind"] == "decode"]
    key = lambda r: tuple((e[0], e[1]) for e in json.loads(r["shape"]))    # noqa: E731
    twins = {key(r): r for r in decode[decode[SHARED_FEATURE] == decode["decode_context_tokens"]].to_dict("records")}
    out = []
    for r in decode[decode[SHARED_FEATURE] < decode["decode_context_tokens"]].to_dict("records"):
        twin = twins.get(key(r))
        if twin is not None:
            reread = r["decode_context_tokens"] - r[SHARED_FEATURE]
            out.append({"rows": int(r["rows"]), "share": reread / r["decode_context_tokens"],
                        "mean_context": r["decode_context_tokens"] / max(1, r["num_decode_seqs"]),
                        "saving_s": (twin["device_s"] - r["device_s"]) / reread, "split": r["split"]})
    return pd.DataFrame(out, columns=cols)


def reread_curve(profile: pd.DataFrame) -> dict:
    """What a re-read KV token saves by the step's re-read share, measured on the profile's
    twin pairs (train and held-out: a raw measurement, no fitted term): per bin of
    REREAD_SHARE_BINS with at least REREAD_MIN_PAIRS pairs, the median share and the median
    saving, made non-increasing in the share (a larger share never saves more per token, and
    a bin's noise must not make it) and >= 0. Returns {"shares", "saving_s", "pairs"} for
    cost_model.reread_saving, or {} without twins (the kinds then price re-reads through
    decode_distinct_context_tokens, as before)."""
    pairs = twin_pairs(profile)
    if pairs.empty:
        return {}
    bins = pd.cut(pairs["share"], REREAD_SHARE_BINS, include_lowest=True)
    g = pairs.groupby(bins, observed=True).agg(share=("share", "median"), saving=("saving_s", "median"),
                                               n=("share", "size"))
    g = g[g["n"] >= REREAD_MIN_PAIRS]
    if g.empty:
        return {}
    saving = np.maximum(np.minimum.accumulate(g["saving"].to_numpy(float)), 0.0)
    return {"shares": [round(float(x), 4) for x in g["share"]], "saving_s": [float(x) for x in saving],
            "pairs": int(g["n"].sum())}


def unshared(table: pd.DataFrame, reread: dict) -> pd.DataFrame:
    """`table`'s steps as if nothing were shared: each step's device time plus what its
    re-reads save (cost_model.reread_saving with the `reread` curve), its distinct KV tokens
    its KV tokens. Rows without re-reads are unchanged."""
    saving = reread_saving(table, reread["shares"], reread["saving_s"])
    return table.assign(device_s=table["device_s"] + saving, **{SHARED_FEATURE: table["decode_context_tokens"]})


# Decode batches whose sequences all have one context length (the grid's batch x context
# points, kept as the unshared twins of its shared shapes: twin_pairs) are not fitted on:
# serving never forms them, and they run apart from the batches it does. Measured on the H200
# (session 13's Qwen3-0.6B profile): a fit with them priced its 16 x 4,096-token batch 5.2% low
# and 16 x 1,024 1.6% low, the profile's own spread 12-decode batches 0.5-2.5% high, and real
# ShareGPT and mooncake_conv decode steps (contexts spread, coefficient of variation 0.4-0.9)
# +1.0% on average; without them the real decode steps +0.4% (Llama-3.1-8B: +1.2% -> +0.6%).
# A batch of one decode is kept (every serving step of one decode is one).
FIT_LOCKSTEP = False


def lockstep_batches(profile: pd.DataFrame) -> pd.Series:
    """Decode rows of two or more decodes whose contexts are all equal (from `shape`; none
    without it: a profile made before shapes were kept)."""
    if "shape" not in profile.columns:
        return pd.Series(False, index=profile.index)
    def equal(shape: str) -> bool:
        contexts = {entry[0] for entry in json.loads(shape)}
        return len(contexts) == 1
    decode = (profile["kind"] == "decode") & (profile["num_decode_seqs"] > 1)
    return decode & profile["shape"].map(equal)


def fit_kinds(profile: pd.DataFrame, step_kinds, note: bool = True) -> dict:
    """{kind: fit_kind(...)} for each of `step_kinds` with train rows in the profile (`note`:
    say so where a kind is fitted without the shared-KV features for want of shared shapes),
    the lockstep decode batches left out (FIT_LOCKSTEP)."""
    kinds = {}
    if not FIT_LOCKSTEP:
        profile = profile[~lockstep_batches(profile)]
    for kind in step_kinds:
        rows = profile[profile["kind"] == kind]
        train, test = rows[rows["split"] == "train"], rows[rows["split"] != "train"]
        if len(train) == 0:
            continue
        features = [f for f in FITTED_FEATURES[kind] if f in profile.columns] + moe_features(profile)
        if SHARED_FEATURE in features and not shares_kv(train).any():
            features = [f for f in features if f not in (SHARED_FEATURE, TAPER_FEATURE)]
            if note:
                print(f"note: no {kind} shape of the profile has decodes sharing KV blocks: "
                      f"{kind} fitted without {SHARED_FEATURE} and {TAPER_FEATURE}")
        kinds[kind] = fit_kind(train, test, features, optional=OPTIONAL_FEATURES + (MOE_FEATURE,),
                               sloped=SLOPED_FEATURES, earn=(TAPER_FEATURE, PREFILL_SPAN_FEATURE, OTHER_CACHED_FEATURE))
    return kinds


# Pairs per key tried for the prefill attention's span (cost_model.prefill_span_tokens): the
# query-key pairs the GPU works through while one of its programs walks one key, i.e. query
# tokens per tile x programs running at once per KV head (Llama-3.1-8B on the H200: 16-token
# tiles, the step's cost per cached token turned from flat to growing with the chunk at about
# 400 tokens, so D ~ 400 there; other models and GPUs differ: the fit picks D).
PREFILL_SPAN_PAIRS = (128, 256, 512, 1024, 2048)


def span_column(profile: pd.DataFrame, pairs_per_key: float) -> list[float]:
    columns = ["num_seqs", "num_decode_seqs", "num_prefill_tokens", "prefill_kv_tokens", "prefill_attention_pairs"]
    columns += [PREFILL_MAX_FEATURE] if PREFILL_MAX_FEATURE in profile.columns else []
    return [prefill_span_tokens(r, pairs_per_key) for r in profile[columns].to_dict("records")]


def with_prefill_max(profile: pd.DataFrame) -> pd.DataFrame:
    """`profile` with PREFILL_MAX_FEATURE (the longest prompt chunk's context after the step),
    for a profile made before it was recorded: from each row's `shape` (its prompt chunks:
    the entries shape_batch does not make decodes); the profile as it is without `shape` (the
    span then takes the chunks' mean context)."""
    if PREFILL_MAX_FEATURE in profile.columns or "shape" not in profile.columns:
        return profile
    def longest(shape: str) -> int:
        return max((ctx for ctx, n, *_ in json.loads(shape) if not is_decode_entry(ctx, n)), default=0)
    return profile.assign(**{PREFILL_MAX_FEATURE: profile["shape"].map(longest)})


def fit_prefill_span(profile: pd.DataFrame, kinds: dict) -> tuple[dict, dict]:
    """The mixed kind's fit (its variant: features, form, slopes) tried again with
    PREFILL_SPAN_FEATURE at each of PREFILL_SPAN_PAIRS; kept: the D whose fit predicts the
    held-out mixed shapes best, if it beats the fit without the span by more than that one's
    standard error (a new term must pay beyond the held-out noise, as fit_kind's `earn`).
    Returns (kinds, {"pairs_per_key": D, "errors": {D: held-out MAPE}}), or (kinds, {}) when
    the span does not pay (or there is no mixed kind, or no prompt chunk behind cached
    context in the profile to tell D by)."""
    if "mixed" not in kinds or PREFILL_SPAN_FEATURE not in FITTED_FEATURES["mixed"]:
        return kinds, {}
    mixed = profile[profile["kind"] == "mixed"]
    if not (mixed["prefill_kv_tokens"] > mixed["num_prefill_tokens"]).any():
        print(f"note: no mixed shape of the profile has a prompt chunk behind cached context: "
              f"mixed fitted without {PREFILL_SPAN_FEATURE}")
        return kinds, {}
    fit = kinds["mixed"]
    slopes = {f: s["knots"] for f, s in (fit.get("slopes") or {}).items()}
    features = [f for f in fit["coefficients"] if f != PREFILL_SPAN_FEATURE] + list(slopes) + [PREFILL_SPAN_FEATURE]
    fits, errors = {}, {}
    for d in PREFILL_SPAN_PAIRS:
        rows = mixed.assign(**{PREFILL_SPAN_FEATURE: span_column(mixed, d)})
        train, test = rows[rows["split"] == "train"], rows[rows["split"] != "train"]
        fits[d] = _fit_base(train, test, features, fit["knots"], slopes)
        errors[d] = fits[d].get("held_out", fits[d]["train"])["mape"]
    best = min(PREFILL_SPAN_PAIRS, key=lambda d: errors[d])
    without = fit.get("held_out", fit["train"])
    if errors[best] >= without["mape"] - without.get("se", 0.0) - TIE_MAPE:
        return kinds, {}
    label = f"{fit['variant']} with {PREFILL_SPAN_FEATURE}"
    forms = {**fit.get("forms", {}), **{f"{label} at {d}": e for d, e in errors.items()}}
    return ({**kinds, "mixed": {**fits[best], "form": fit["form"], "variant": label, "forms": forms}},
            {"pairs_per_key": best, "errors": {str(d): e for d, e in errors.items()}})


# Exponents tried for how a prompt chunk's tokens route (cost_model.routing_units): 1 = every
# token on its own (uniform routing), 0 = the whole chunk as one token.
CHUNK_ROUTING_EXPONENTS = (1.0, 0.75, 0.5, 0.25, 0.0)


def fit_chunk_routing(profile: pd.DataFrame, kinds: dict, moe: dict) -> tuple[dict, dict]:
    """The step kinds with prompt chunks (mixed, eager) re-fitted with MOE_FEATURE counted at
    each of CHUNK_ROUTING_EXPONENTS; kept: the largest exponent (the closest to every token
    routed on its own) whose fits predict the held-out shapes of those kinds within one
    standard error of the best exponent's (pooled mean APE; train rows where a kind has no
    held-out ones): a profile's chunks route by their random token ids and seed, and
    exponents a standard error apart are not told apart by it. Returns (kinds, the "moe"
    section with `chunk_routing_exponent` and `chunk_routing_errors`: {exponent: held-out
    MAPE})."""
    chunked = [k for k in kinds if k != "decode"]
    if not chunked:
        return kinds, moe
    E, k = int(moe["num_experts"]), int(moe["top_k"])
    records = profile.to_dict("records")
    fits, errors, ses = {}, {}, {}
    for a in CHUNK_ROUTING_EXPONENTS:
        touched = [moe_experts_touched(E, k, r, int(r["rows"]), a) for r in records]
        fits[a] = fit_kinds(profile.assign(**{MOE_FEATURE: touched}), chunked)
        scored = [fit.get("held_out", fit["train"]) for fit in fits[a].values()]
        n = sum(s["n"] for s in scored)
        errors[a] = sum(s["n"] * s["mape"] for s in scored) / n
        ses[a] = math.sqrt(sum((s["n"] * s.get("se", 0.0)) ** 2 for s in scored)) / n
    lowest = min(CHUNK_ROUTING_EXPONENTS, key=lambda a: errors[a])
    best = max(a for a in CHUNK_ROUTING_EXPONENTS if errors[a] <= errors[lowest] + ses[lowest] + TIE_MAPE)
    return ({**kinds, **fits[best]},
            {**moe, "chunk_routing_exponent": best, "chunk_routing_errors": {str(a): e for a, e in errors.items()}})


# ---- mixture of experts ----------------------------------------------------------------
# A MoE step reads, per MoE layer, the experts its rows are routed to (cost_model.MOE_FEATURE,
# the expected count under uniform routing). For the profile to measure that as serving
# does: its dummy sequences carry random token ids (all-zero sequences route every row to
# the same k experts: a batch-256 decode would read 8 of Qwen3-30B-A3B's 128 experts where a
# serving batch reads all), and extra shapes put real token counts between the CUDA-graph
# sizes (a padded step reads the experts of its real rows plus one for the padding, not
# those of its graph size), so the feature is measured apart from the graph size's base.

def moe_profile_columns(table: pd.DataFrame, num_experts: int, top_k: int) -> pd.DataFrame:
    """The profile with MOE_FEATURE: expected distinct experts per MoE layer of each step,
    from its tokens and the rows the engine ran it as, every token routed on its own (the
    fit re-counts the chunks' tokens: fit_chunk_routing)."""
    touched = [step_experts_touched(num_experts, top_k, int(t), int(r))
               for t, r in zip(table["num_batched_tokens"], table["rows"])]
    return table.assign(**{MOE_FEATURE: touched})


def moe_meta(model_config) -> dict:
    """The calibration metadata of a mixture-of-experts model ({} for a dense one)."""
    if not model_config.is_moe:
        return {}
    return {"moe": {"num_experts": model_config.num_experts, "top_k": model_config.num_experts_per_tok,
                    "moe_layers": len(model_config.moe_layers)}}


def moe_features(profile: pd.DataFrame) -> list[str]:
    return [MOE_FEATURE] if MOE_FEATURE in profile.columns else []


def moe_section(profile: pd.DataFrame, meta: dict) -> dict:
    """{"moe": {num_experts, top_k, ...}} for a profile with MOE_FEATURE (the fitted model
    computes the feature from them), {} otherwise."""
    if not moe_features(profile):
        return {}
    if not isinstance(meta.get("moe"), dict):
        raise ValueError(f"the profile has {MOE_FEATURE}: the calibration metadata needs "
                         "'moe' with num_experts and top_k")
    return {"moe": dict(meta["moe"])}


def moe_held_out(calib: dict, profile: pd.DataFrame, graphs: CudaGraphs) -> dict:
    """How the calibration predicts the held-out MoE shapes (token counts between the graph
    sizes), next to the same fit without MOE_FEATURE: {"n", "mape", "mape_without"}; {}
    without such shapes."""
    if not moe_features(profile) or "grid" not in profile.columns:
        return {}
    held = profile[(profile["grid"] == "moe") & (profile["split"] != "train")]
    if held.empty:
        return {}
    meta = {k: calib[k] for k in ("model", "device", "command")}
    without = fit_calibration(profile.drop(columns=[MOE_FEATURE]), meta)
    real = held["device_s"].to_numpy(float)

    def mape(c):
        model = FittedCostModel(c, graphs=graphs)
        return float(np.mean(np.abs(np.array([model.predict(r) for r in held.to_dict("records")]) - real) / real))
    return {"n": int(len(held)), "mape": mape(calib), "mape_without": mape(without)}


def print_moe_held_out(report: dict) -> None:
    if report:
        print(f"MoE shapes between the graph sizes (held out, n={report['n']}): MAPE "
              f"{100 * report['mape']:.2f}% ({100 * report['mape_without']:.2f}% fitted without {MOE_FEATURE})")


def fit_hardware(profile: pd.DataFrame, model: ModelSpec, hw: HardwareSpec, tp: int,
                 graphs: CudaGraphs, sweeps: int = 4, block_size: int | None = None,
                 pdl_max_tokens: int = 0) -> tuple[HardwareSpec, dict]:
    """The roofline's parameters fitted on this one profile (simulator.hardware_fit's fit,
    on one model: its efficiencies, fixed costs and host overheads), and its mean relative
    error per step kind on the held-out rows. One model cannot tell a fixed cost from its
    weight reads, so the result describes this model on the GPU (the calibration's
    .hardware.yaml); the GPU's own file is fitted on several (python -m
    simulator.hardware_fit). `block_size`: the engine's KV block size in the profile, which
    the fitted efficiencies then describe (`attention_reference_block`; the spec's own if
    None); `pdl_max_tokens`: the engine's."""
    from simulator.hardware_fit import Profile, fit_joint, kind_errors
    one = Profile("profile", "device", model, tp, graphs, block_size or hw.attention_reference_block,
                  pdl_max_tokens, "?", with_shared_feature(profile, "the profile"))
    fitted = fit_joint([one], hw, sweeps)
    return fitted, {kind: e["mape"] for kind, e in kind_errors(one, fitted).items()}


def print_fit(calib: dict, roofline: dict | None = None) -> None:
    """The held-out error per step kind (and the fitted roofline's, if given)."""
    print(f"{'kind':<7} {'variant':<56} {'n train':>8} {'n held':>7} {'held-out MAPE':>14} {'p90 APE':>8} {'max APE':>8}"
          + ("  roofline MAPE" if roofline else "") + "  (other variants: held-out MAPE)")
    for kind, fit in calib["kinds"].items():
        held = fit.get("held_out", {})
        form = fit.get("variant", fit.get("form", ""))
        others = ", ".join(f"{k} {100 * v:.2f}%" for k, v in fit.get("forms", {}).items() if k != form)
        line = (f"{kind:<7} {form:<56} {fit['train']['n']:>8} {held.get('n', 0):>7} "
                f"{100 * held.get('mape', float('nan')):>13.2f}% {100 * held.get('p90_ape', float('nan')):>7.2f}% "
                f"{100 * held.get('max_ape', float('nan')):>7.2f}%")
        if roofline:
            line += f"  {100 * roofline.get(kind, float('nan')):>12.2f}%"
        print(line + (f"  ({others})" if others else ""))
    reread = calib.get("reread") or {}
    if reread:
        print(f"re-reads (the kinds priced as if unshared): saving per re-read KV token by share, "
              f"{reread.get('pairs', '?')} twin pairs: " + ", ".join(
                  f"{100 * x:.0f}%: {1e9 * y:.1f} ns" for x, y in zip(reread["shares"], reread["saving_s"])))
    span = calib.get("prefill_span") or {}
    if span:
        errors = ", ".join(f"{d}: {100 * e:.2f}%" for d, e in span.get("errors", {}).items())
        print(f"mixed: {PREFILL_SPAN_FEATURE} at {span['pairs_per_key']} pairs per key "
              f"(held-out MAPE of the mixed kind by pairs per key: {errors})")
    moe = calib.get("moe") or {}
    if "chunk_routing_exponent" in moe:
        errors = ", ".join(f"{a}: {100 * e:.2f}%" for a, e in moe.get("chunk_routing_errors", {}).items())
        print(f"moe: a prompt chunk of n tokens routes as n^{moe['chunk_routing_exponent']} tokens "
              f"(held-out MAPE of the kinds with chunks by exponent: {errors})")
    clock = calib.get("clock") or {}
    if clock:
        held = clock["held_out"]
        print(f"clock: tau {1e3 * clock['tau_s']:.0f} ms, slowdown per PFLOP/s of heat: decode "
              f"{clock['slowdown']['decode']:.3f}, prompt {clock['slowdown']['prompt']:.3f} (the kinds fitted on "
              f"base-clock times); held-out cool and hot timings from back to back: MAPE "
              f"{100 * held['mape']:.2f}% ({100 * held['mape_without']:.2f}% without the term, n={held['n']})")
    host = calib["host"]
    print(f"host: launch {1e6 * host['launch_s']:.1f} us + {1e6 * host['launch_seq_s']:.2f} us/seq "
          f"+ {1e6 * host.get('launch_token_s', 0.0):.3f} us/prompt token "
          f"+ {1e6 * host.get('launch_prompt_s', 0.0):.1f} us/step with a prompt, "
          f"receive {1e6 * host['receive_s']:.1f} us + {1e6 * host['receive_seq_s']:.2f} us/seq")


def step_errors(calib: dict, graphs: CudaGraphs, steps: "pd.DataFrame") -> dict:
    """How the calibration predicts a real run's own steps (a steps.parquet with device_s, in
    step order): per step kind, n and the median / mean of (predicted - measured) / measured,
    and the predicted / measured sum of device time. A calibration with a clock term prices
    each step under it along the run's own device timeline, and with an idle cost adds it
    (simulator.clock.price_along_run), as the
    simulator prices it along its own; a run recorded without `gpu_gap_s` cannot be."""
    steps = with_shared_feature(steps[steps["device_s"].notna() & (steps["num_seqs"] > 0)], "the run")
    model = FittedCostModel(calib, graphs=graphs)
    lacking = [f for f in model.plan_features if f not in steps.columns]
    if lacking:
        raise ValueError(f"the run's steps have no {', '.join(lacking)} (recorded before the engine "
                         "logged it from its split-KV decode plan), which this calibration prices: "
                         "record the run again, compute it (python -m experiments.plan_features <run dir> "
                         "--calibration <file> --out <steps>), or check it against a calibration fitted without it")
    rows = steps.to_dict("records")
    kinds = [graphs.rows(r)[0] for r in rows]
    pred = np.array([model.predict(r) for r in rows])
    pred = price_along_run(model.clock, model.idle, steps, pred)[1]
    real = steps["device_s"].to_numpy(float)
    out = {}
    for kind in sorted(set(kinds)):
        m = np.array([k == kind for k in kinds])
        err = (pred[m] - real[m]) / real[m]
        out[kind] = {"n": int(m.sum()), "median_error": float(np.median(err)), "mean_error": float(err.mean()),
                     "predicted_s": float(pred[m].sum()), "measured_s": float(real[m].sum())}
    return out


def size_errors(calib: dict, graphs: CudaGraphs, steps: "pd.DataFrame",
                profile: "pd.DataFrame | None" = None) -> "pd.DataFrame":
    """How the calibration predicts a real run's steps by CUDA-graph size: one row per
    (kind, rows) with n, the run's mean error (predicted - measured) / measured, its share of
    the run's device time, and (given the calibration's `profile`) the mean error of the
    profile's own shapes of that size. The fit passes through every graph size of the
    profile, so a size whose run error departs from the profile's by more than the rest is
    a size that ran at another speed in the run than when profiled: measured on the H200, an
    engine's start-up choice of GEMM kernels per row count (engine.kernels.skinny_gemm's
    plan) moved Llama-3.1-8B decode steps of one size by up to -21% / +14% between two
    engines of the same commit."""
    steps = with_shared_feature(steps[steps["device_s"].notna() & (steps["num_seqs"] > 0)], "the run")
    model = FittedCostModel(calib, graphs=graphs)
    def table(rows_df: "pd.DataFrame") -> "pd.DataFrame":
        rows = rows_df.to_dict("records")
        kind_rows = [graphs.rows(r) for r in rows]
        pred = np.array([model.predict(r) for r in rows])
        real = rows_df["device_s"].to_numpy(float)
        return pd.DataFrame({"kind": [k for k, _ in kind_rows], "rows": [n for _, n in kind_rows],
                             "err": (pred - real) / real, "device_s": real})
    run = table(steps)
    out = run.groupby(["kind", "rows"]).agg(n=("err", "size"), run_error=("err", "mean"),
                                             device_s=("device_s", "sum"))
    out["share"] = out.pop("device_s") / run["device_s"].sum()
    if profile is not None:
        prof = table(profile[profile["kind"].isin(list(calib["kinds"]))])
        out["profile_error"] = prof.groupby(["kind", "rows"])["err"].mean()
    return out.reset_index()


def reread_savings(calib: dict, graphs: CudaGraphs, profile: "pd.DataFrame") -> "pd.DataFrame":
    """What a re-read of a shared KV block saves, measured against what the calibration prices:
    the profile's twin pairs (twin_pairs) with measured_ns (the twin's device time less the
    shared shape's, per re-read token) and fit_ns (the calibration's price of the shared shape
    as if unshared, less its price, per re-read token). Empty without twins."""
    cols = ["rows", "share", "mean_context", "measured_ns", "fit_ns", "split"]
    pairs = twin_pairs(profile)
    if pairs.empty:
        return pd.DataFrame(columns=cols)
    model = FittedCostModel(calib, graphs=graphs)
    decode = profile[profile["kind"] == "decode"]     # (the same pairs, in order, priced)
    priced = twin_pairs(decode.assign(device_s=[model.predict(r) for r in decode.to_dict("records")]))
    return pairs.assign(measured_ns=1e9 * pairs["saving_s"], fit_ns=1e9 * priced["saving_s"].to_numpy())[cols]


def print_reread_savings(table: "pd.DataFrame") -> None:
    if table.empty:
        return
    t = table.assign(batch=pd.cut(table["rows"], [0, 8, 64, 256, math.inf], labels=["1-8", "9-64", "65-256", ">256"]),
                     reread=pd.cut(table["share"], [0, 0.3, 0.6, 1.0], labels=["<=30%", "30-60%", ">60%"]))
    g = t.groupby(["batch", "reread"], observed=True).agg(n=("share", "size"), measured_ns=("measured_ns", "median"),
                                                          fit_ns=("fit_ns", "median"))
    print("saving per re-read token of shared decode shapes against their unshared twins (median ns; "
          "rows: graph size, re-read: share of the KV):")
    for (batch, reread), r in g.iterrows():
        print(f"  rows {batch:<7} re-read {reread:<7} n={int(r.n):<4} measured {r.measured_ns:6.1f}  fit {r.fit_ns:6.1f}")


def clock_ratios(profile: pd.DataFrame) -> pd.DataFrame:
    """The GPU clock's effect as the profile measured it (experiments.calibrate): shapes timed
    cool, right after light decode steps (`device_cool_s`, by prompt tokens), cold, after
    the device sat idle (`device_cold_s`, by step kind), and hot, right after heavy prompt
    steps (`device_hot_s`, by step kind), against back to back: timing, group,
    n and the median and p10 / p90 of their device time over the back-to-back one. Empty for
    a profile without the columns (made before session 13)."""
    cols = ["timing", "group", "n", "median", "p10", "p90"]
    out = []
    for timing, column in (("cool", "device_cool_s"), ("cold", "device_cold_s"), ("hot", "device_hot_s")):
        if column not in profile.columns:
            continue
        timed = profile[profile[column].notna() & (profile[column] > 0)]
        if timed.empty:
            continue
        ratio = timed[column] / timed["device_s"]
        groups = (pd.cut(timed["num_prefill_tokens"], [0, 1024, 2048, 4096, math.inf], right=False,
                         labels=["<1k", "1-2k", "2-4k", ">=4k"]) if timing == "cool" else timed["kind"])
        for group, r in ratio.groupby(groups, observed=True):
            out.append({"timing": timing, "group": str(group), "n": len(r), "median": r.median(),
                        "p10": r.quantile(0.1), "p90": r.quantile(0.9)})
    return pd.DataFrame(out, columns=cols)


def print_clock_ratios(table: "pd.DataFrame") -> None:
    if table.empty:
        return
    print("the GPU clock: device time timed cool (prompt steps right after light decode steps, by "
          "prompt tokens), cold (after 50 ms idle, by kind) and hot (right after heavy prompt steps, "
          "by kind) over back to back:")
    for r in table.itertuples():
        print(f"  {r.timing:<5} {r.group:<7} n={r.n:<4} median {r.median:.3f}  p10 {r.p10:.3f}  p90 {r.p90:.3f}")


def print_size_errors(table: "pd.DataFrame") -> None:
    has_profile = "profile_error" in table.columns
    print("by CUDA-graph size (rows): n, mean error on the run's steps"
          + (", on the profile's shapes of that size" if has_profile else "") + ", share of the run's device time")
    for r in table.itertuples():
        line = f"  {r.kind:<7} {r.rows:>5}  n={r.n:<6} run {100 * r.run_error:+6.1f}%"
        if has_profile:
            line += f"  profile {100 * r.profile_error:+6.1f}%" if r.profile_error == r.profile_error else "  profile    -  "
        print(line + f"  {100 * r.share:5.1f}% of device time")


def print_step_errors(errors: dict, source: str) -> None:
    print(f"the calibration on the steps of {source} (device time, (predicted - measured) / measured):")
    for kind, e in errors.items():
        print(f"  {kind:<7} n={e['n']:<6} median {100 * e['median_error']:+.1f}%  mean "
              f"{100 * e['mean_error']:+.1f}%  sum {e['predicted_s']:.2f} s predicted / {e['measured_s']:.2f} s measured")


def _plain(value):
    """The value with numpy scalars (what a fit hands back) as Python numbers, which
    yaml.safe_dump can write."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.item() if isinstance(value, np.generic) else value


def write_hardware(hw: HardwareSpec, path, note: str) -> None:
    with open(path, "w") as f:
        f.write(f"# {note}\n")
        yaml.safe_dump(_plain(dataclasses.asdict(hw)), f, sort_keys=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", help="a profile parquet (python -m experiments.calibrate writes one)")
    ap.add_argument("--out", required=True, help="calibration JSON to write")
    ap.add_argument("--meta", default=None, help="JSON of the profile's metadata (default: "
                    "<profile without .profile.parquet>.json's, i.e. the calibration it came with)")
    ap.add_argument("--hardware", default=None, help="conf/hardware/<gpu>.yaml to fit the roofline from")
    ap.add_argument("--model", default=None, help="conf/model/<name>.yaml (with --hardware)")
    ap.add_argument("--hardware-out", default=None, help="where to write the fitted hardware YAML")
    ap.add_argument("--check-steps", default=None,
                    help="a real run's steps.parquet: print how the calibration predicts its steps")
    ap.add_argument("--device-time", default="device_s", choices=("device_s", "device_idle_s"),
                    help="which device time of the profile to fit: device_s (steps back to back, "
                         "as serving runs them; the default) or device_idle_s (each from an idle device)")
    ap.add_argument("--clock", action="store_true",
                    help="also fit the clock term on the profile's launch timeline (<name>.timeline.parquet)")
    args = ap.parse_args(argv)
    profile = pd.read_parquet(args.profile)
    if args.device_time != "device_s":
        if args.device_time not in profile.columns:
            sys.exit(f"{args.profile} has no {args.device_time} (profiled before it was recorded)")
        profile = profile.assign(device_s=profile[args.device_time])
    meta_path = args.meta or args.profile.replace(".profile.parquet", ".json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        sys.exit(f"{meta_path}: no metadata (give --meta, a JSON with model, device, command)")
    if meta.get("decode_plan"):     # features the grid's shapes give that the profile lacks
        profile = with_plan_features(profile, meta)    # (the fit and --check-steps price them)
    timeline = None
    if args.clock:
        timeline_path = args.profile.replace(".profile.parquet", ".timeline.parquet")
        if timeline_path == args.profile or not os.path.isfile(timeline_path):
            sys.exit(f"--clock: no launch timeline next to {args.profile} ({timeline_path}: profiled "
                     "before session 15 recorded it)")
        timeline = pd.read_parquet(timeline_path)
        if model_flops(meta) is None:
            sys.exit(f"--clock: no conf/model/{meta.get('model')}.yaml to count the model's FLOPs")
    calib = fit_calibration(profile, meta, timeline, model_flops(meta) if timeline is not None else None)
    # a re-fit keeps where the profile came from (made when, how long, the kernels its engine
    # ran: engine.kernel_plan=<file> must still run them; its step loop's host window) and says
    # how it was re-fitted
    calib["created"] = meta.get("created", calib["created"])
    calib.update({k: meta[k] for k in ("profile_s", "profiled", "kernel_plan", "host_serving") if k in meta})
    calib["refit"] = {"command": "python -m simulator.calibrate " + " ".join(sys.argv[1:] if argv is None else argv),
                      "date": datetime.date.today().isoformat()}
    FittedCostModel(calib)   # loads back
    with open(args.out, "w") as f:
        json.dump(calib, f, indent=2)
        f.write("\n")
    print_fit(calib)
    print_reread_savings(reread_savings(calib, CudaGraphs.for_calibration(meta.get("engine")),
                                        with_causal_pairs(profile)))
    print_clock_ratios(clock_ratios(profile))
    if args.hardware:
        if not args.model or not args.hardware_out:
            sys.exit("--hardware needs --model and --hardware-out")
        model_cfg = yaml.safe_load(open(args.model))
        model = ModelSpec.from_hf_config(model_cfg["hf_config"], name=model_cfg["name"])
        hw = HardwareSpec(**yaml.safe_load(open(args.hardware)))
        e = meta.get("engine", {})
        graphs = CudaGraphs.for_calibration(e)
        fitted, report = fit_hardware(profile, model, hw, int(meta.get("tp", 1)), graphs,
                                      block_size=e.get("block_size"), pdl_max_tokens=e.get("pdl_max_tokens") or 0)
        write_hardware(fitted, args.hardware_out, f"fitted on {args.profile} ({meta.get('device')})")
        print("roofline held-out MAPE: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in report.items()))
    if args.check_steps:
        graphs = CudaGraphs.for_calibration(meta.get("engine"))
        try:
            checked = pd.read_parquet(args.check_steps)
            errors = step_errors(calib, graphs, checked)
            sizes = size_errors(calib, graphs, checked, profile)
        except ValueError as e:
            sys.exit(f"--check-steps {args.check_steps}: {e}")
        print_step_errors(errors, args.check_steps)
        print_size_errors(sizes)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
