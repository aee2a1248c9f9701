"""One GPU's roofline parameters fitted jointly on the profiles of several models, so that a
model with no calibration file of its own gets the best analytic estimate on that GPU.

`python -m simulator.calibrate` fits the roofline on one model's profile, and what it finds
describes that model: one model cannot tell a fixed cost from its weight reads (both are the
same every step), nor GEMM from attention efficiency when its prompts' attention is half
their FLOPs. Fitted on several models at once, the parameters have to hold for all of them:
what is left is what the GPU (and the engine's kernels on it) does, and the
leave-one-model-out error says what to expect for a model never profiled.

    python -m simulator.hardware_fit simulator/calibrations/*.profile.parquet \\
        --hardware conf/hardware/h200.yaml --out conf/hardware/h200.yaml \\
        [--leave-one-out simulator/calibrations/leave_one_out]

A GPU of the same compute die as a fitted one but without profiles of its own (the H100
next to the H200: the same GH100, other HBM) gets the fitted file's rates, shape and engine
costs, its own peaks, memory, interconnect and measured block costs kept:

    python -m simulator.hardware_fit --transfer-from conf/hardware/h200.yaml \\
        --hardware conf/hardware/h100.yaml --out conf/hardware/h100.yaml

Each profile needs its metadata JSON beside it (<name>.json: model, device, tp, engine), as
`python run.py experiment=calibrate` writes them; the model is read from conf/model/<model>.yaml.
All profiles must come from one device. Prints per profile and step kind the held-out MAPE
of the --hardware file as given (the datasheet leads, the first time), of the joint fit and,
with --leave-one-out, of the fit without the profile's model; ends with one JSON line.
"""
import argparse
import dataclasses
import datetime
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from simulator.calibrate import host_columns, with_shared_feature
from simulator.cost_model import (REPO_ROOT, CudaGraphs, ModelSpec, RooflineCostModel,
                                  nonnegative_lstsq, profiled_block_size)
from simulator.hardware import HardwareSpec

# The parameters a joint fit searches, with their ranges (a log grid each): the rates and
# the shape of the roofline. What each one describes is in HardwareSpec.
SEARCHED = {
    "flops_efficiency": (0.05, 1.0),
    "gemm_depth_overhead": (0.0, 4096.0),       # only with two dense models or more
    "attention_flops_efficiency": (0.05, 1.0),  # unless the file states it (MEASURED)
    "roofline_exponent": (1.0, 32.0),           # and infinity (the max)
    "bandwidth_efficiency": (0.05, 1.0),
    "attention_bandwidth_efficiency": (0.02, 1.0),
    "expert_flops_efficiency": (0.05, 1.0),     # only with a mixture of experts
    "shared_kv_read_cost": (0.02, 1.0),         # only with decodes sharing KV blocks
}
# Where the fit starts each searched parameter, and what a parameter the profiles cannot
# determine (fitted_params) is: HardwareSpec's defaults, but for the GEMM depth overhead,
# whose default 0 leaves the datasheet files as they were. 384 is what the H200's dense
# profiles agree on: fitted alone, each model's prompt steps of >= 512 rows give GEMM
# efficiencies 0.72 / 0.71 (Llama-3.1-8B TP1 / TP2) and 0.61 (Qwen3-0.6B) with K0 = 0,
# 0.80 / 0.80 / 0.86 with K0 = 512, equal near 384 (simulator/calibrations/README.md).
LEADS = {"gemm_depth_overhead": 384.0}
# Parameters a kernel benchmark measures on the GPU: a hardware file that states one keeps
# it (the fit neither searches nor rewrites it); null: fitted.
MEASURED = ("attention_flops_efficiency",)
# The fixed costs: a step's time is linear in them (RooflineCostModel adds them outside the
# rooflines), so for each trial of the searched parameters they are solved exactly (solve_fixed,
# non-negative): over a few models a step's fixed cost and its layers' (28 / 32 / 48 layers)
# are nearly collinear, and a search one parameter at a time stalls on that valley.
FIXED = ("step_fixed_s", "layer_fixed_s", "pdl_layer_saving_s",
         "allreduce_latency_s",      # only with a tp > 1 profile
         "layer_launch_s")           # only with eager steps in a profile
# Tried and left out, the leave-one-model-out error deciding (simulator/calibrations/README.md):
# flops_half_tokens (GEMM efficiency rising with a step's rows: fitted 0 jointly, and without
# Llama-3.1-8B it grew until Llama's decode came out +74%); a fixed cost per MoE layer beyond
# a dense layer's (router, top-k, token alignment: solved 0 s, the per-layer cost covers it);
# in session 8: the elementwise kernels' activation traffic at a fitted bandwidth (each
# leave-one-out fit put it elsewhere: off, 0.23 and 0.68 of HBM), GEMMs priced by waves of
# 128 x 128 output tiles on 132 SMs (the fits pinned flops_efficiency at 1.0 and moved the
# fixed costs), a per-layer fixed cost of steps with a prompt chunk (solved 0-4 us), and
# weighing each step by its time in the error (Qwen3-0.6B's held-out mixed steps -22%).
PROFILE_COLUMNS = ("kind", "rows", "split", "device_s", "num_seqs", "num_batched_tokens",
                   "num_prefill_tokens", "num_decode_seqs", "num_sampled", "decode_context_tokens",
                   "prefill_kv_tokens", "prefill_attention_pairs", "host_launch_s", "host_receive_s")


@dataclass(frozen=True)
class Profile:
    """One model's profile on the device: its step shapes and times, and what the roofline
    needs to price them (the model, tensor parallelism, the engine's CUDA graphs and block
    size)."""
    name: str
    device: str
    model: ModelSpec
    tp: int
    graphs: CudaGraphs
    block_size: int
    pdl_max_tokens: int
    engine_commit: str
    steps: pd.DataFrame
    _rows: dict = field(default_factory=dict, compare=False, repr=False)

    def rows(self, split: str | None = None) -> tuple[list[dict], np.ndarray]:
        """(feature dicts, device seconds) of the steps of `split` ("train" | "held_out";
        None: all), made once."""
        if split not in self._rows:
            df = self.steps if split is None else self.steps[self.steps["split"] == split]
            self._rows[split] = (df.to_dict("records"), df["device_s"].to_numpy(float))
        return self._rows[split]


def load_profile(path, meta_path=None, model_dir=None) -> Profile:
    """A profile parquet and its metadata JSON (default: <path without .profile.parquet>.json),
    the model from `model_dir`/<meta model>.yaml (default conf/model). Raises ValueError (one
    line, naming the file) for an empty profile, missing columns or metadata."""
    path = Path(path)
    meta_path = Path(meta_path) if meta_path else path.with_name(path.name.replace(".profile.parquet", ".json"))
    if not path.is_file():
        raise ValueError(f"{path}: no such profile")
    if not meta_path.is_file():
        raise ValueError(f"{path}: no metadata {meta_path} (the calibration JSON written with it)")
    meta = json.loads(meta_path.read_text())
    steps = pd.read_parquet(path)
    if steps.empty:
        raise ValueError(f"{path}: the profile has no steps")
    missing = [c for c in PROFILE_COLUMNS if c not in steps.columns]
    if missing:
        raise ValueError(f"{path}: the profile lacks columns {missing}")
    if not (steps["device_s"] > 0).all():
        raise ValueError(f"{path}: the profile has device times <= 0 or missing")
    if not (steps["split"] == "train").any():
        raise ValueError(f"{path}: the profile has no train rows")
    for key in ("model", "device"):
        if not meta.get(key):
            raise ValueError(f"{meta_path}: the metadata has no {key!r}")
    steps = with_shared_feature(steps, str(path))
    model_file = Path(model_dir or REPO_ROOT / "conf" / "model") / f"{meta['model']}.yaml"
    if not model_file.is_file():
        raise ValueError(f"{path}: model {meta['model']!r} has no {model_file}")
    model_cfg = yaml.safe_load(model_file.read_text())
    model = ModelSpec.from_hf_config(model_cfg["hf_config"], name=model_cfg.get("name", meta["model"]))
    engine = meta.get("engine", {})
    graphs = CudaGraphs.for_calibration(engine)
    return Profile(path.name.replace(".profile.parquet", ""), meta["device"], model, int(meta.get("tp", 1)),
                   graphs, int(profiled_block_size(meta)), int(engine.get("pdl_max_tokens") or 0),
                   str(meta.get("engine_commit") or "?"), steps)


def check_profiles(profiles: list[Profile]) -> None:
    """Raises ValueError (one line) unless there are profiles, all of one device."""
    if not profiles:
        raise ValueError("no profiles to fit")
    devices = sorted({p.device for p in profiles})
    if len(devices) > 1:
        raise ValueError("profiles of different devices (" + ", ".join(
            f"{p.name}: {p.device}" for p in profiles) + "): a hardware file describes one")
    blocks = sorted({p.block_size for p in profiles})
    if len(blocks) > 1:
        raise ValueError(f"profiles at different KV block sizes {blocks}: fit them at one")


def relative_errors(profile: Profile, hw: HardwareSpec, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """((predicted - measured) / measured per step, the steps' kinds) of `split`."""
    rows, times = profile.rows(split)
    kinds = np.array([r["kind"] for r in rows])
    return (predictions(profile, hw, split) - times) / times, kinds


def without_fixed(hw: HardwareSpec, fixed: tuple) -> HardwareSpec:
    """`hw` with the fixed costs of `fixed` at 0 (and the PDL saving, which may not exceed
    layer_fixed_s, with it); the others keep `hw`'s values."""
    zero = {n: 0.0 for n in fixed}
    if "layer_fixed_s" in fixed:
        zero["pdl_layer_saving_s"] = 0.0
    return dataclasses.replace(hw, **zero)


def predictions(profile: Profile, hw: HardwareSpec, split: str | None = None) -> np.ndarray:
    """The roofline's device time of each step of `split`."""
    rows, _ = profile.rows(split)
    cost = RooflineCostModel(profile.model, hw, profile.tp, profile.graphs, pdl_max_tokens=profile.pdl_max_tokens)
    return np.array([cost.predict(r) for r in rows])


def kind_errors(profile: Profile, hw: HardwareSpec, split: str = "held_out") -> dict:
    """{kind: {"n", "mape", "bias"}} of the profile's `split` steps (bias: mean signed error)."""
    err, kinds = relative_errors(profile, hw, split)
    return {k: {"n": int((kinds == k).sum()), "mape": float(np.abs(err[kinds == k]).mean()),
                "bias": float(err[kinds == k].mean())} for k in sorted(set(kinds))}


def joint_error(profiles: list[Profile], hw: HardwareSpec, split: str = "train") -> float:
    """Mean over profiles of each one's mean absolute relative error on `split` (each
    profile weighs the same, whatever its number of shapes)."""
    return float(np.mean([np.abs(relative_errors(p, hw, split)[0]).mean() for p in profiles]))


def fitted_params(profiles: list[Profile], hw: HardwareSpec | None = None) -> tuple[dict, tuple]:
    """(SEARCHED, FIXED) less what the profiles cannot determine: the GEMM depth overhead
    without two dense models (one model's GEMMs all grow with its rows together, so K0
    only scales its efficiency; models of different widths tell them apart), the expert
    GEMMs' efficiency without a mixture of experts, the shared-read cost without decodes
    sharing KV blocks, the PDL saving without an engine using PDL, the all-reduce latency
    without tp > 1, the eager launch cost without eager steps; and the attention FLOP
    efficiency where `hw` states it (MEASURED)."""
    searched = dict(SEARCHED)
    if len({p.model.name for p in profiles if not p.model.config.is_moe}) < 2:
        searched.pop("gemm_depth_overhead")
    if not any(p.model.config.is_moe for p in profiles):
        searched.pop("expert_flops_efficiency")
    if not any((p.steps["decode_distinct_context_tokens"] < p.steps["decode_context_tokens"]).any()
               for p in profiles):
        searched.pop("shared_kv_read_cost")
    for name in MEASURED:
        if hw is not None and getattr(hw, name) is not None:
            searched.pop(name)
    skip = {"pdl_layer_saving_s": not any(p.pdl_max_tokens for p in profiles),
            "allreduce_latency_s": all(p.tp == 1 for p in profiles),
            "layer_launch_s": not any((p.steps["kind"] == "eager").any() for p in profiles)}
    return searched, tuple(n for n in FIXED if not skip.get(n))


HOST_TERMS = {   # profile column -> the overheads fitted on it: fixed, per sequence, per prompt
    # token, per step with a prompt chunk
    "host_launch_s": ("step_overhead_s", "seq_overhead_s", "prefill_token_overhead_s", "prefill_step_overhead_s"),
    "host_receive_s": ("update_overhead_s", "update_seq_overhead_s"),
}


def fit_host_joint(profiles: list[Profile]) -> dict:
    """Host costs of the step loop (HardwareSpec's step/seq/update overheads): fixed + per
    scheduled sequence (+ per prompt token and per step with a prompt chunk for the launch:
    a chunk is packed token by token, and the prefill path has work of its own),
    non-negative least squares over every profile's steps, each profile weighted
    the same."""
    out = {}
    for column, names in HOST_TERMS.items():
        X, y = [], []
        for p in profiles:
            w = 1 / np.sqrt(len(p.steps))
            X.append(w * host_columns(p.steps)[:, :len(names)])
            y.append(w * p.steps[column].to_numpy(float))
        coef = nonnegative_lstsq(np.vstack(X), np.concatenate(y))
        out |= {name: float(c) for name, c in zip(names, coef)}
    return out


def fit_joint(profiles: list[Profile], hw: HardwareSpec, sweeps: int = 4,
              params: tuple[dict, tuple] | None = None, polish_iterations: int = 300) -> HardwareSpec:
    """`hw` with the parameters `params` (default: fitted_params; searched, fixed) that
    minimise joint_error on the profiles' train steps: a search over the searched ones from
    each of STARTS, the fixed costs solved for each trial (FIXED), the best fit kept; and
    the host costs of fit_host_joint. Peaks, memory, interconnect bandwidth and the measured
    attention block costs stay `hw`'s; every parameter of SEARCHED and FIXED starts from
    HardwareSpec's lead, not from `hw`'s value, and one the profiles cannot determine
    (fitted_params) stays there: a re-fit of the file this wrote gives the same file, and a
    fit leaving a model out learns nothing from it through the file."""
    check_profiles(profiles)
    searched, fixed = fitted_params(profiles, hw) if params is None else params
    leads = {f.name: f.default for f in dataclasses.fields(HardwareSpec)
             if (f.name in SEARCHED or f.name in FIXED) and not (f.name in MEASURED and f.name not in searched)}
    leads |= LEADS
    for name in ("attention_flops_efficiency", "expert_flops_efficiency"):    # None: flops_efficiency's
        if name in searched and leads[name] is None:
            leads[name] = leads["flops_efficiency"]
    base = dataclasses.replace(hw, **leads, **fit_host_joint(profiles),
                               attention_reference_block=profiles[0].block_size)
    columns = [fixed_columns(p, base, fixed) for p in profiles]
    fits = [search(profiles, dataclasses.replace(base, **{k: v for k, v in start.items() if k in searched}),
                   searched, fixed, columns, sweeps, polish_iterations) for start in STARTS]
    return min(fits, key=lambda fit: fit[1])[0]


# Where the search starts: HardwareSpec's leads, and two points between them and what the
# H200 profiles say; the error has several local minima (a step's fixed cost against its
# layers', the rates against the exponent), and from the leads alone the search stopped in
# one 2% (relative) above the best the others found.
STARTS = ({}, {"roofline_exponent": 2.0, "bandwidth_efficiency": 0.8, "attention_flops_efficiency": 0.4},
          {"roofline_exponent": 4.0, "flops_efficiency": 0.6, "attention_flops_efficiency": 0.3})
# Besides its log grid, each searched parameter tries these multiples of its current value.
STEPS = (0.7, 0.85, 0.95, 1.05, 1.2, 1.4)


def search(profiles: list[Profile], start: HardwareSpec, searched: dict, fixed: tuple,
           columns: list[np.ndarray], sweeps: int, polish_iterations: int) -> tuple[HardwareSpec, float]:
    """(spec, joint train error) from `start`: `sweeps` passes of a coordinate search (each
    searched parameter over a log grid of its range and STEPS around its value, kept where
    the error falls), then `polish`."""
    best, err = solve_fixed(profiles, start, fixed, columns)
    for _ in range(sweeps):
        for name, (lo, hi) in searched.items():
            current = getattr(best, name)
            candidates = set(np.geomspace(max(lo, hi / 1e4), hi, 25)) | {lo}
            if math.isfinite(current):
                candidates |= {current} | {min(hi, max(lo, current * f)) for f in STEPS}
            if name == "roofline_exponent":
                candidates.add(math.inf)
            for value in sorted(candidates):
                trial, e = solve_fixed(profiles, dataclasses.replace(best, **{name: float(value)}), fixed, columns)
                if e < err:
                    best, err = trial, e
    return polish(profiles, best, err, searched, fixed, columns, polish_iterations)


def polish(profiles: list[Profile], best: HardwareSpec, err: float, searched: dict, fixed: tuple,
           columns: list[np.ndarray], iterations: int = 300) -> tuple[HardwareSpec, float]:
    """The coordinate search's result moved on by a Nelder-Mead simplex over all searched
    parameters at once (log of each, shifted where 0 is allowed; roofline_exponent as 1 / p,
    0 the max), the fixed costs
    solved at each point: the rates trade off against each other (bandwidth against FLOP
    efficiency against the exponent near the ridge), a valley that moves of one parameter
    at a time cross only slowly."""
    names = list(searched)
    shift = {n: hi * 1e-4 if lo == 0 else 0.0 for n, (lo, hi) in searched.items()}   # log of a 0

    def to_x(hw):
        return np.array([1 / getattr(hw, n) if n == "roofline_exponent" else math.log(getattr(hw, n) + shift[n])
                         for n in names])

    def to_spec(x):
        values = {}
        for n, v in zip(names, x):
            lo, hi = searched[n]
            if n == "roofline_exponent":
                values[n] = math.inf if v <= 1 / (2 * hi) else 1 / min(1 / lo, max(1 / hi, v))
            else:
                values[n] = min(hi, max(lo, math.exp(v) - shift[n]))
        return dataclasses.replace(best, **values)

    def f(x):
        return solve_fixed(profiles, to_spec(x), fixed, columns)[1]
    if not names:
        return best, err
    x0 = to_x(best)
    simplex = [x0] + [x0 + 0.1 * np.eye(len(names))[i] for i in range(len(names))]
    values = [err] + [f(x) for x in simplex[1:]]
    for _ in range(iterations):
        order = np.argsort(values)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < 1e-9:            # the simplex has converged
            break
        centroid = np.mean(simplex[:-1], axis=0)
        worst = simplex[-1]
        reflected = centroid + (centroid - worst)
        fr = f(reflected)
        if fr < values[0]:
            expanded = centroid + 2 * (centroid - worst)
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            inside = centroid + 0.5 * (worst - centroid)
            fi = f(inside)
            if fi < values[-1]:
                simplex[-1], values[-1] = inside, fi
            else:                                   # shrink towards the best point
                simplex = [simplex[0]] + [simplex[0] + 0.5 * (x - simplex[0]) for x in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    x = simplex[int(np.argmin(values))]
    return solve_fixed(profiles, to_spec(x), fixed, columns) if min(values) < err else (best, err)


MICROSECOND = 1e-6


def fixed_columns(profile: Profile, hw: HardwareSpec, fixed: tuple) -> np.ndarray:
    """The profile's train steps x `fixed`: the seconds each fixed cost adds to a step per
    second of it, read off the cost model (they add outside the rooflines, so this holds
    whatever the searched parameters). pdl_layer_saving_s's column is layer_fixed_s's on
    the steps past the PDL range (0 within it): its coefficient b and layer_fixed_s's a
    make layer_fixed_s = a + b, the saving b, both >= 0 as HardwareSpec wants."""
    zero = without_fixed(hw, fixed)
    base = predictions(profile, zero, "train")
    cols = []
    for name in fixed:
        # a PDL saving is a share of layer_fixed_s (it may not exceed it): both move together
        names = ("layer_fixed_s", name) if name == "pdl_layer_saving_s" else (name,)
        unit = dict.fromkeys(names, MICROSECOND)
        cols.append((predictions(profile, dataclasses.replace(zero, **unit), "train") - base) / MICROSECOND)
    return np.column_stack(cols) if cols else np.zeros((len(base), 0))


def solve_fixed(profiles: list[Profile], hw: HardwareSpec, fixed: tuple,
                columns: list[np.ndarray], rounds: int = 8) -> tuple[HardwareSpec, float]:
    """`hw` with the fixed costs that minimise joint_error on the profiles' train steps
    given its other parameters (non-negative), and that error. The mean absolute relative
    error is minimised by iteratively reweighted least squares: each round weighs a step by
    1 / (its profile's steps x its current |error|), `rounds` rounds (a least-squares fit
    alone lands elsewhere: 7.87% against 7.58% on the H200 profiles, at the same rates)."""
    zero = without_fixed(hw, fixed)
    rests = [predictions(p, zero, "train") for p in profiles]
    times = [p.rows("train")[1] for p in profiles]

    def errors(coef):
        return [(r + X @ coef - t) / t for r, X, t in zip(rests, columns, times)]
    coef = np.zeros(len(fixed))
    if fixed:
        weights = [np.full(len(t), 1 / len(t)) for t in times]
        for _ in range(rounds):
            root = [np.sqrt(w) / t for w, t in zip(weights, times)]
            coef = nonnegative_lstsq(np.vstack([X * s[:, None] for X, s in zip(columns, root)]),
                                     np.concatenate([(t - r) * s for t, r, s in zip(times, rests, root)]))
            weights = [1 / (len(e) * np.maximum(np.abs(e), 1e-4)) for e in errors(coef)]
    values = dict(zip(fixed, map(float, coef)))
    if "pdl_layer_saving_s" in values:
        values["layer_fixed_s"] = values.get("layer_fixed_s", 0.0) + values["pdl_layer_saving_s"]
    err = float(np.mean([np.abs(e).mean() for e in errors(coef)]))
    return dataclasses.replace(zero, **values), err


def leave_one_out(profiles: list[Profile], hw: HardwareSpec, sweeps: int = 4,
                  polish_iterations: int = 300) -> dict[str, HardwareSpec]:
    """{model name: `hw` fitted jointly on the profiles of every other model} (a model's
    profiles at other tensor-parallel sizes are left out with it: what a model never
    profiled gets). Needs profiles of two models or more."""
    check_profiles(profiles)
    models = list(dict.fromkeys(p.model.name for p in profiles))
    if len(models) < 2:
        raise ValueError("leave-one-out needs profiles of two models or more")
    return {m: fit_joint([p for p in profiles if p.model.name != m], hw, sweeps, polish_iterations=polish_iterations)
            for m in models}


def error_table(profiles: list[Profile], specs: dict) -> list[dict]:
    """One row per profile, spec and step kind: held-out n, MAPE and bias. `specs`: {label:
    HardwareSpec, or {model name: HardwareSpec} (a spec per model, e.g. leave-one-out)}."""
    rows = []
    for p in profiles:
        for label, spec in specs.items():
            hw = spec[p.model.name] if isinstance(spec, dict) else spec
            for kind, e in kind_errors(p, hw).items():
                rows.append({"profile": p.name, "hardware": label, "kind": kind, **e})
    return rows


def print_table(rows: list[dict]) -> None:
    labels = list(dict.fromkeys(r["hardware"] for r in rows))
    print(f"{'profile':<28} {'kind':<7} {'n':>4}  " + "  ".join(f"{l + ' MAPE (bias)':>26}" for l in labels))
    keys = list(dict.fromkeys((r["profile"], r["kind"]) for r in rows))
    for profile, kind in keys:
        cells = {r["hardware"]: r for r in rows if (r["profile"], r["kind"]) == (profile, kind)}
        n = next(iter(cells.values()))["n"]
        print(f"{profile:<28} {kind:<7} {n:>4}  " + "  ".join(
            f"{100 * cells[l]['mape']:>15.1f}% ({100 * cells[l]['bias']:+6.1f}%)" for l in labels))


FIT_NOTE = "# fit: "    # the comment lines write_spec owns (replaced on every write)


def fitted_fields() -> list[str]:
    """Every field a fit may write: the searched rates and shape, the fixed costs, the host
    overheads and the block-cost reference."""
    return list(SEARCHED) + list(FIXED) + [n for names in HOST_TERMS.values() for n in names] + [
        "attention_reference_block"]


def transfer(source: HardwareSpec, target: HardwareSpec) -> tuple[HardwareSpec, list[str]]:
    """`target` with `source`'s fitted values (fitted_fields), for a GPU of `source`'s compute
    die that has no profiles: the efficiencies are fractions of each file's own datasheet
    peaks, so they carry over with the die (the same SMs, clocks and kernels), and the fixed
    costs and host overheads are the engine's. Kept from `target`: its peaks, memory,
    interconnect bandwidth, measured attention block costs, and a MEASURED value it states.
    Returns (the spec, the fields taken). Raises ValueError (one line) when the dense peaks
    differ: another die, whose rates the fit says nothing about."""
    if source.peak_tflops != target.peak_tflops:
        raise ValueError(f"a transfer needs GPUs of one compute die (the same dense peak): {source.name} "
                         f"{source.peak_tflops:g} TFLOP/s, {target.name} {target.peak_tflops:g}")
    taken = [n for n in fitted_fields() if not (n in MEASURED and getattr(target, n) is not None)]
    return dataclasses.replace(target, **{n: getattr(source, n) for n in taken}), taken


def write_spec(hw: HardwareSpec, path, source: str, fields: list[str], note: list[str]) -> None:
    """Write `source` (the hardware YAML fitted from) to `path` with `fields` set to `hw`'s
    values (4 significant digits: a readable file): each such line replaced where the file
    has one, the others added after its last top-level field line; every other line kept
    (the datasheet comments, the measured attention_block_cost and its comment). `note`
    becomes the FIT_NOTE comment lines above `name:`, replacing the ones a fit wrote before.
    The result must load as `hw` (rounded)."""
    values = {}
    for name in fields:
        v = getattr(hw, name)
        values[name] = float(f"{v:.4g}") if isinstance(v, float) and math.isfinite(v) else v
    lines = [line for line in source.splitlines() if not line.startswith(FIT_NOTE)]

    def text_of(name):
        return yaml.safe_dump({name: values[name]}, default_flow_style=True).strip().strip("{}")
    last_field, done = 0, set()
    for i, line in enumerate(lines):
        key = line.split(":", 1)[0]
        if line[:1].isalpha() and ":" in line:
            if key in values:
                lines[i] = text_of(key)
                done.add(key)
            if key != "attention_block_cost":
                last_field = i
    lines[last_field + 1:last_field + 1] = [text_of(k) for k in fields if k not in done]
    name_at = next(i for i, line in enumerate(lines) if line.startswith("name:"))
    lines[name_at:name_at] = [FIT_NOTE + line for line in note]
    text = "\n".join(lines) + "\n"
    written = HardwareSpec(**yaml.safe_load(text))
    for name in fields:
        got, want = getattr(written, name), getattr(hw, name)
        assert got == want or math.isclose(got, want, rel_tol=1e-3), (name, got, want)
    Path(path).write_text(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="*", help="profile parquets (python run.py experiment=calibrate writes them)")
    ap.add_argument("--transfer-from", default=None, metavar="FILE",
                    help="instead of fitting: take FILE's fitted values (a fitted hardware YAML of the same "
                    "compute die) into --hardware, written to --out")
    ap.add_argument("--hardware", required=True, help="the GPU's hardware YAML: its peaks, memory, interconnect "
                    "and block costs are kept, the fitted values and `# fit:` lines replaced")
    ap.add_argument("--out", default=None, help="where to write the jointly fitted hardware YAML")
    ap.add_argument("--leave-one-out", default=None, metavar="DIR",
                    help="also fit without each model's profiles, for each model, and write DIR/<gpu>-without-<model>.yaml")
    ap.add_argument("--sweeps", type=int, default=4, help="coordinate-search sweeps (default 4)")
    ap.add_argument("--polish", type=int, default=300, help="Nelder-Mead iterations after them (default 300)")
    args = ap.parse_args(argv)
    command = "python -m simulator.hardware_fit " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.transfer_from:
        return main_transfer(args, command)
    if not args.profiles:
        sys.exit("error: give profile parquets to fit on, or --transfer-from a fitted file")
    try:
        profiles = [load_profile(p) for p in args.profiles]
        check_profiles(profiles)
        given = HardwareSpec(**yaml.safe_load(Path(args.hardware).read_text()))
        joint = fit_joint(profiles, given, args.sweeps, polish_iterations=args.polish)
        loo = leave_one_out(profiles, given, args.sweeps, args.polish) if args.leave_one_out else None
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    specs = {"given": given, "joint": joint} | ({"leave-one-out": loo} if loo else {})
    rows = error_table(profiles, specs)
    print("held-out steps, roofline (predicted - measured) / measured:")
    print_table(rows)
    source = [f"{p.name} (engine {p.engine_commit[:7]})" for p in profiles]
    searched, fixed = fitted_params(profiles, given)
    # every searched name, determined or at its lead (a leave-one-out fit may lack what the
    # joint one has), but a measured one the file states; the fixed costs the profiles determine
    fitted = [n for n in fitted_fields() if not (n in FIXED and n not in fixed)
              and not (n in MEASURED and n not in searched)]
    text = Path(args.hardware).read_text()
    done = f"command: {command} ({datetime.date.today().isoformat()})"
    if args.out:
        write_spec(joint, args.out, text, fitted,
                   [f"efficiencies, fixed costs and host overheads fitted jointly on {len(profiles)} "
                    f"profiles of {profiles[0].device}:", *[f"  {s}" for s in source], done])
        print(f"wrote {args.out}")
    if loo:
        out_dir = Path(args.leave_one_out)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, spec in loo.items():
            path = out_dir / f"{given.name}-without-{name}.yaml"
            kept = [s for s, p in zip(source, profiles) if p.model.name != name]
            write_spec(spec, path, text, fitted,
                       [f"fitted jointly on the profiles of models other than {name} (leave one model out):"]
                       + [f"  {s}" for s in kept] + [done])
            print(f"wrote {path}")
    print(json.dumps({"joint": {r["profile"] + "/" + r["kind"]: round(r["mape"], 4) for r in rows if r["hardware"] == "joint"},
                      **({"leave_one_out": {r["profile"] + "/" + r["kind"]: round(r["mape"], 4)
                                            for r in rows if r["hardware"] == "leave-one-out"}} if loo else {})}))


def main_transfer(args, command: str) -> None:
    """--transfer-from: write --hardware with the fitted file's values (transfer) to --out,
    the fit comment lines naming the file and what it was fitted on."""
    if args.profiles or not args.out:
        sys.exit("error: --transfer-from takes no profiles and needs --out")
    try:
        source_text = Path(args.transfer_from).read_text()
        source = HardwareSpec(**yaml.safe_load(source_text))
        target_text = Path(args.hardware).read_text()
        spec, taken = transfer(source, HardwareSpec(**yaml.safe_load(target_text)))
    except (ValueError, OSError, TypeError) as e:
        sys.exit(f"error: {e}")
    fitted_on = [line[len(FIT_NOTE):] for line in source_text.splitlines()
                 if line.startswith(FIT_NOTE) and not line.startswith(FIT_NOTE + "command:")]
    note = [f"efficiencies, fixed costs and host overheads transferred from {args.transfer_from} "
            f"(the same compute die, {source.peak_tflops:g} TFLOP/s dense; not profiled here), there:",
            *[f"  {line}" for line in fitted_on],
            f"command: {command} ({datetime.date.today().isoformat()})"]
    write_spec(spec, args.out, target_text, taken, note)
    print(f"wrote {args.out}: {len(taken)} values from {args.transfer_from}")


if __name__ == "__main__":
    main()
