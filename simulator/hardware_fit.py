"""One GPU's roofline parameters fitted jointly on the profiles of several models, so that a
model with no calibration file of its own gets the best analytic estimate on that GPU.

`python -m simulator.calibrate` fits the roofline on one model's profile; the parameters it
finds absorb that model's quirks (a small model's GEMMs run at half the efficiency of a
large one's, a mixture of experts pays its router on every layer). Fitted on several models
at once, the parameters have to hold for all of them: what is left is what the GPU (and
the engine's kernels on it) does, and the leave-one-model-out error says what to expect
for a model never profiled.

    python -m simulator.hardware_fit simulator/calibrations/*.profile.parquet \\
        --hardware conf/hardware/h200.yaml --out conf/hardware/h200.yaml [--leave-one-out]

Each profile needs its metadata JSON beside it (<name>.json: model, device, tp, engine), as
`python run.py experiment=calibrate` writes them; the model is read from conf/model/<model>.yaml.
All profiles must come from one device. Prints per profile and step kind the held-out MAPE
of the datasheet file and of the joint fit (and, with --leave-one-out, of the fit on the
other profiles), and ends with one JSON line.
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

from simulator.cost_model import REPO_ROOT, CudaGraphs, ModelSpec, RooflineCostModel
from simulator.hardware import HardwareSpec

# The parameters a joint fit searches, with their ranges (log-spaced candidates). What each
# one describes is in HardwareSpec; `fitted_params` drops those no profile can determine.
JOINT_FIT = {
    "flops_efficiency": (0.05, 1.0),
    "attention_flops_efficiency": (0.05, 1.0),
    "roofline_exponent": (1.0, 32.0),           # and infinity (the max)
    "bandwidth_efficiency": (0.05, 1.0),
    "attention_bandwidth_efficiency": (0.02, 1.0),
    "step_fixed_s": (0.0, 5e-3),
    "layer_fixed_s": (0.0, 200e-6),
    "pdl_layer_saving_s": (0.0, 100e-6),        # only with profiles of an engine using PDL
    "moe_layer_fixed_s": (0.0, 200e-6),         # only with a mixture-of-experts profile
    "allreduce_latency_s": (0.0, 200e-6),       # only with a tp > 1 profile
    "shared_kv_read_cost": (0.02, 1.0),         # only with decodes sharing KV blocks
}
# Tried and left out (the leave-one-model-out error decides; simulator/calibrations/README.md).
JOINT_EXTRA = {"flops_half_tokens": (0.0, 4096.0), "layer_launch_s": (0.0, 500e-6)}
# Where the search starts, besides the given file: a step's fixed cost can sit on the step or
# on its layers, nearly the same over a few models; a coordinate search does not cross from
# one to the other, so it also starts with the cost on the layers (about 25 us per layer, as
# a small model's decode at batch 1 says) and keeps the better fit.
STARTS = ({}, {"step_fixed_s": 50e-6, "layer_fixed_s": 25e-6, "pdl_layer_saving_s": 5e-6,
               "bandwidth_efficiency": 0.8, "roofline_exponent": 2.0})
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
    if "decode_distinct_context_tokens" not in steps.columns:
        steps = steps.assign(decode_distinct_context_tokens=steps["decode_context_tokens"])
    model_file = Path(model_dir or REPO_ROOT / "conf" / "model") / f"{meta['model']}.yaml"
    if not model_file.is_file():
        raise ValueError(f"{path}: model {meta['model']!r} has no {model_file}")
    model_cfg = yaml.safe_load(model_file.read_text())
    model = ModelSpec.from_hf_config(model_cfg["hf_config"], name=model_cfg.get("name", meta["model"]))
    engine = meta.get("engine", {})
    graphs = CudaGraphs.for_engine(engine.get("max_num_seqs", 256), engine.get("max_num_batched_tokens", 8192),
                                   engine.get("cuda_graph_max_tokens", 0))
    return Profile(path.name.replace(".profile.parquet", ""), meta["device"], model, int(meta.get("tp", 1)),
                   graphs, int(engine.get("block_size", 16)), int(engine.get("pdl_max_tokens") or 0), str(meta.get("engine_commit") or "?"), steps)


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
    cost = RooflineCostModel(profile.model, hw, profile.tp, profile.graphs, pdl_max_tokens=profile.pdl_max_tokens)
    pred = np.array([cost.predict(r) for r in rows])
    kinds = np.array([r["kind"] for r in rows])
    return (pred - times) / times, kinds


def kind_errors(profile: Profile, hw: HardwareSpec, split: str = "held_out") -> dict:
    """{kind: {"n", "mape", "bias"}} of the profile's `split` steps (bias: mean signed error)."""
    err, kinds = relative_errors(profile, hw, split)
    return {k: {"n": int((kinds == k).sum()), "mape": float(np.abs(err[kinds == k]).mean()),
                "bias": float(err[kinds == k].mean())} for k in sorted(set(kinds))}


def joint_error(profiles: list[Profile], hw: HardwareSpec, split: str = "train") -> float:
    """Mean over profiles of each one's mean absolute relative error on `split` (each
    profile weighs the same, whatever its number of shapes)."""
    return float(np.mean([np.abs(relative_errors(p, hw, split)[0]).mean() for p in profiles]))


def fitted_params(profiles: list[Profile]) -> dict:
    """JOINT_FIT less what the profiles cannot determine: all-reduce latency without a
    tensor-parallel profile, the shared-read cost without decodes sharing KV blocks."""
    params = dict(JOINT_FIT)
    if all(p.tp == 1 for p in profiles):
        params.pop("allreduce_latency_s")
    if not any(p.pdl_max_tokens for p in profiles):
        params.pop("pdl_layer_saving_s")
    if not any(p.model.config.is_moe for p in profiles):
        params.pop("moe_layer_fixed_s")
    if not any((p.steps["decode_distinct_context_tokens"] < p.steps["decode_context_tokens"]).any()
               for p in profiles):
        params.pop("shared_kv_read_cost")
    return params


def fit_host_joint(profiles: list[Profile]) -> dict:
    """Host costs of the step loop (HardwareSpec's step/seq/update overheads): fixed + per
    scheduled sequence, least squares over every profile's steps, each profile weighted
    the same."""
    from simulator.cost_model import nonnegative_lstsq
    out = {}
    for column, (fixed, per_seq) in {"host_launch_s": ("step_overhead_s", "seq_overhead_s"),
                                     "host_receive_s": ("update_overhead_s", "update_seq_overhead_s")}.items():
        X, y = [], []
        for p in profiles:
            w = 1 / np.sqrt(len(p.steps))
            X.append(w * np.column_stack([np.ones(len(p.steps)), p.steps["num_seqs"].to_numpy(float)]))
            y.append(w * p.steps[column].to_numpy(float))
        coef = nonnegative_lstsq(np.vstack(X), np.concatenate(y))
        out[fixed], out[per_seq] = float(coef[0]), float(coef[1])
    return out


def fit_joint(profiles: list[Profile], hw: HardwareSpec, sweeps: int = 4,
              params: dict | None = None) -> HardwareSpec:
    """`hw` with the parameters of `params` (default: fitted_params) that minimise
    joint_error on the profiles' train steps (a coordinate search from each of STARTS, the
    better fit kept), and the host costs of fit_host_joint. Peaks, memory, interconnect
    bandwidth and the measured attention block costs stay `hw`'s."""
    check_profiles(profiles)
    params = fitted_params(profiles) if params is None else params
    base = dataclasses.replace(hw, **fit_host_joint(profiles), attention_reference_block=profiles[0].block_size)
    if "attention_flops_efficiency" in params and base.attention_flops_efficiency is None:
        base = dataclasses.replace(base, attention_flops_efficiency=base.flops_efficiency)
    fits = []
    for start in STARTS:
        fit = dataclasses.replace(base, **{k: v for k, v in start.items() if k in params})
        fits.append(coordinate_search(profiles, fit, params, sweeps))
    return min(fits, key=lambda f: f[1])[0]


def coordinate_search(profiles: list[Profile], best: HardwareSpec, params: dict,
                      sweeps: int) -> tuple[HardwareSpec, float]:
    """(spec, joint train error) after `sweeps` passes over `params`, each trying a log grid
    over its range and steps around its current value, keeping whatever lowers the error."""
    err = joint_error(profiles, best)
    for _ in range(sweeps):
        for name, (lo, hi) in params.items():
            current = getattr(best, name)
            candidates = set(np.geomspace(max(lo, hi / 1e4), hi, 25)) | {lo}
            if math.isfinite(current):
                candidates |= {current} | {min(hi, max(lo, current * f)) for f in (0.7, 0.85, 0.95, 1.05, 1.2, 1.4)}
            if name == "roofline_exponent":
                candidates.add(math.inf)
            for value in sorted(candidates):
                try:
                    trial = dataclasses.replace(best, **{name: float(value)})
                except ValueError:       # out of HardwareSpec's bounds (a saving above its cost)
                    continue
                e = joint_error(profiles, trial)
                if e < err:
                    best, err = trial, e
    return best, err


def leave_one_out(profiles: list[Profile], hw: HardwareSpec, sweeps: int = 4) -> dict[str, HardwareSpec]:
    """{model name: `hw` fitted jointly on the profiles of every other model} (a model's
    profiles at other tensor-parallel sizes are left out with it: what a model never
    profiled gets). Needs profiles of two models or more."""
    check_profiles(profiles)
    models = list(dict.fromkeys(p.model.name for p in profiles))
    if len(models) < 2:
        raise ValueError("leave-one-out needs profiles of two models or more")
    return {m: fit_joint([p for p in profiles if p.model.name != m], hw, sweeps) for m in models}


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



def write_spec(hw: HardwareSpec, path, header: list[str]) -> None:
    """The spec as a hardware YAML (HardwareSpec's fields), `header` as comment lines."""
    fields = dataclasses.asdict(hw)
    with open(path, "w") as f:
        for line in header:
            f.write(f"# {line}\n".replace("# \n", "#\n"))
        yaml.safe_dump(fields, f, sort_keys=False)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="+", help="profile parquets (python run.py experiment=calibrate writes them)")
    ap.add_argument("--hardware", required=True, help="the GPU's hardware YAML: its peaks are kept, "
                    "its efficiencies and overheads are the datasheet leads compared against")
    ap.add_argument("--out", default=None, help="where to write the jointly fitted hardware YAML")
    ap.add_argument("--leave-one-out", default=None, metavar="DIR",
                    help="also fit without each model's profiles, for each model, and write DIR/<gpu>-without-<model>.yaml")
    ap.add_argument("--sweeps", type=int, default=4, help="coordinate-search sweeps (default 4)")
    args = ap.parse_args(argv)
    try:
        profiles = [load_profile(p) for p in args.profiles]
        check_profiles(profiles)
        datasheet = HardwareSpec(**yaml.safe_load(Path(args.hardware).read_text()))
        joint = fit_joint(profiles, datasheet, args.sweeps)
        loo = leave_one_out(profiles, datasheet, args.sweeps) if args.leave_one_out else None
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    specs = {"datasheet": datasheet, "joint": joint} | ({"leave-one-out": loo} if loo else {})
    rows = error_table(profiles, specs)
    print("held-out steps, roofline (predicted - measured) / measured:")
    print_table(rows)
    command = "python -m simulator.hardware_fit " + " ".join(sys.argv[1:] if argv is None else argv)
    source = [f"{p.name} (engine {p.engine_commit[:7]})" for p in profiles]
    fitted = [k for k in fitted_params(profiles)] + ["step_overhead_s", "seq_overhead_s",
                                                     "update_overhead_s", "update_seq_overhead_s"]
    if args.out:
        write_spec(joint, args.out, [f"{datasheet.name}: datasheet peaks; efficiencies and overheads fitted jointly "
                                     f"on {len(profiles)} profiles of {profiles[0].device}:"] + source
                   + [f"fitted: {', '.join(fitted)}", f"command: {command} ({datetime.date.today().isoformat()})"])
        print(f"wrote {args.out}")
    if loo:
        out_dir = Path(args.leave_one_out)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, spec in loo.items():
            path = out_dir / f"{datasheet.name}-without-{name}.yaml"
            write_spec(spec, path, [f"{datasheet.name} fitted jointly on the profiles of models other than {name}:"]
                       + [s for s, p in zip(source, profiles) if p.model.name != name] + [f"command: {command}"])
            print(f"wrote {path}")
    print(json.dumps({"joint": {r["profile"] + "/" + r["kind"]: round(r["mape"], 4) for r in rows if r["hardware"] == "joint"},
                      **({"leave_one_out": {r["profile"] + "/" + r["kind"]: round(r["mape"], 4)
                                            for r in rows if r["hardware"] == "leave-one-out"}} if loo else {})}))


if __name__ == "__main__":
    main()
