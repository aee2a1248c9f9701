"""The twin's fidelity table: the same cells run on the engine (each `--repeats` times) and
on the simulator (fitted and roofline cost models), errors (sim - real) / real per metric
next to the spread of the real repeats, the policy-effect pairs (does the simulator
predict the measured change of each metric?), and the step-for-step replay check of
every real run.

    python benchmarks/fidelity/run_fidelity.py --model qwen3-0.6b --hardware h200 \\
        --calibration simulator/calibrations/qwen3-0.6b-h200-tp1.json \\
        --out benchmarks/fidelity/results/qwen3-0.6b-h200 \\
        [--traces sharegpt,azure_conv,mooncake_conv] [--loads 0.25,0.5,0.8,1.1]
        [--num-requests 400] [--repeats 3] [--pairs policy,budget,block_size,prefix_caching]
        [--stages capacity,real,sim,table] [--set engine.tensor_parallel_size=2 ...]

Stages (each reads what the earlier ones wrote under --out, so they can run apart):
  capacity  per trace, the saturation throughput the fitted simulator predicts (requests/s
            at an offered load far past capacity); --loads are fractions of it (or give
            absolute rates with --rates). Poisson traces vary request_rate; traces with
            their own timestamps (azure_conv, mooncake_conv) vary time_scale.
  real      every cell on the engine, --repeats times, one engine per engine setting
            (LLMEngine.reset between runs: same start-up, fresh prefix cache).
  sim       every cell on the simulator with cost_model=fitted and roofline (the
            hardware file of --roofline-hardware, default conf/hardware/<--hardware>.yaml; and
            roofline_fitted: the calibration's own fitted hardware parameters if present), and
            cost_model=replay on every real run (policy equivalence).
  table     table.csv (one row per cell x metric x cost model), table.md, effects.csv
            (policy-effect pairs), equivalence.csv, steps.csv (the fitted model on every real
            run's own steps: device time error per step kind, each run replayed for the
            split-KV plan's features), fidelity_vs_load.png and fidelity_effects.png (shown in
            table.md); prints the summary, ends with one JSON line.

Cells: each trace at each load with the base settings; the pairs at the highest load
below capacity: policy (chunked -> prefill_first), budget (max_num_batched_tokens 8192 ->
2048), block_size (16 -> 64 under memory pressure: a KV pool of --pressure-tokens tokens),
prefix_caching (on -> off, mooncake_conv only).
"""
import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir  # noqa: E402

from analysis.compare import split_rule_note  # noqa: E402
from analysis.runs import load_run  # noqa: E402

from experiments.config import register_configs  # noqa: E402
from experiments.replay import build_engine, run  # noqa: E402
from experiments.config import build  # noqa: E402
from simulator.hardware import HardwareSpec  # noqa: E402

METRICS = ["request_throughput", "output_throughput"] + [
    f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p90", "p99")]
# The targets up to capacity: the fitted model within 2% on throughput and on the mean,
# median and p90 of TPOT and E2E, 5% on those of TTFT; a roofline model within 15% on the same.
TARGETS = {"request_throughput": 0.02,
           **{f"{s}_{m}_ms": 0.05 if m == "ttft" else 0.02
              for m in ("ttft", "tpot", "e2el") for s in ("mean", "median", "p90")}}
ROOFLINE_TARGET = 0.15
TIMED_TRACES = ("azure_conv", "azure_code", "mooncake_conv")   # replayed on their own timestamps
PAIRS = {
    "policy": (["scheduler=chunked"], ["scheduler=prefill_first"]),
    "budget": (["scheduler.max_num_batched_tokens=8192"], ["scheduler.max_num_batched_tokens=2048"]),
    "block_size": (["cache.block_size=16"], ["cache.block_size=64"]),
    "prefix_caching": (["cache.enable_prefix_caching=true"], ["cache.enable_prefix_caching=false"]),
}


def compose_cfg(overrides: list[str]):
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        return compose("config", overrides=overrides)


def native_rate(base: list[str], trace: str, n: int) -> float:
    """Requests/s of a timestamped trace replayed at time_scale 1."""
    from traces import load_trace
    df = load_trace(build(compose_cfg(base + [f"trace={trace}", f"trace.num_requests={n}"])).trace)
    span = float(df["arrival_s"].max() - df["arrival_s"].min())
    return (len(df) - 1) / span if span > 0 else math.inf


def cells(args, capacity: dict, common: list[str]) -> list[dict]:
    """Every cell: name, trace, load label, overrides (beyond the common ones), `group` (the
    load cell a pair belongs to) and `dir` (where its runs live: a pair side that composes
    to the very config of its load cell shares that cell's runs)."""
    out = []
    for trace in args.traces:
        cap = capacity[trace]
        rates = args.rates or [f * cap["capacity_rps"] for f in args.loads]
        below = [r for r in rates if r < cap["capacity_rps"]] or rates
        for k, rate in enumerate(rates):
            over = [f"trace={trace}", f"trace.num_requests={args.num_requests}"]
            if trace in TIMED_TRACES:    # time_scale = native / wanted
                over.append(f"trace.time_scale={cap['native_rps'] / rate:.6g}")
            else:
                over += ["trace.arrival=poisson", f"trace.request_rate={rate:.6g}"]
            group = f"{trace}-L{k}"
            base = dict(trace=trace, load=f"{rate:.3g}rps", rate=rate, pair=None, side=None, group=group,
                        below_capacity=rate < cap["capacity_rps"])
            out.append(dict(base, name=group, dir=group, overrides=over))
            base_config = build(compose_cfg(common + ["mode=gpu"] + over))
            if rate != max(below):
                continue
            for pair in args.pairs:
                if pair == "prefix_caching" and trace != "mooncake_conv":
                    continue
                extra = [f"cache.num_blocks={args.pressure_tokens // b}" for b in (16, 64)] \
                    if pair == "block_size" else [None, None]
                for side, (sets, more) in enumerate(zip(PAIRS[pair], extra)):
                    o = over + sets + ([more] if more else [])
                    name = f"{group}-{pair}{side}"
                    same = build(compose_cfg(common + ["mode=gpu"] + o)) == base_config
                    out.append(dict(base, name=name, dir=group if same else name, overrides=o,
                                    pair=pair, side=side))
    return out


def stage_capacity(args, common) -> dict:
    """Saturation throughput of the fitted simulator per trace (offered far past capacity)."""
    capacity = {}
    for trace in args.traces:
        over = common + ["mode=sim", "cost_model=fitted", f"cost_model.path={args.calibration}",
                         f"trace={trace}", f"trace.num_requests={args.num_requests}"]
        native = native_rate(common, trace, args.num_requests) if trace in TIMED_TRACES else None
        over += ["trace.time_scale=0.001"] if trace in TIMED_TRACES else ["trace.arrival=burst"]
        metrics = run(compose_cfg(over), args.out / "capacity" / trace)
        if not metrics["request_throughput"] > 0:
            sys.exit(f"capacity of {trace}: no request completed (do its requests fit "
                     "scheduler.max_model_len?)")
        capacity[trace] = {"capacity_rps": metrics["request_throughput"], "native_rps": native}
        print(f"capacity {trace}: {metrics['request_throughput']:.2f} req/s (fitted simulator)")
    (args.out / "capacity.json").write_text(json.dumps(capacity, indent=2))
    return capacity


def stage_real(args, common, todo) -> None:
    """Every cell on the engine, --repeats times, one engine per distinct engine setting. The
    engines run the kernels the calibration's profile ran where it records them
    (engine.kernel_plan): chosen afresh by timing, one size of step can run up to 20% apart."""
    pin = [f"engine.kernel_plan={args.calibration}"] if "kernel_plan" in json.loads(
        Path(args.calibration).read_text()) else []
    groups = {}
    for cell in {c["dir"]: c for c in todo}.values():    # one run set per directory
        cfg = compose_cfg(common + ["mode=gpu"] + pin + cell["overrides"])
        rc = build(cfg)
        key = (rc.scheduler, rc.cache, rc.num_blocks, rc.engine)
        groups.setdefault(key, []).append((cell, cfg, rc))
    for group in groups.values():
        engine = build_engine(group[0][2])
        try:
            for cell, cfg, _ in group:
                for rep in range(args.repeats):
                    run_dir = args.out / "real" / cell["dir"] / f"r{rep}"
                    if (run_dir / "summary.json").is_file() and not args.force:
                        continue
                    run(cfg, run_dir, engine=engine)
        finally:
            engine.close()


def hardware_overrides(path) -> list[str]:
    """Hydra overrides that make the run's hardware the file's: every HardwareSpec field,
    those the file leaves out at their defaults (not at conf/hardware's values)."""
    spec = HardwareSpec(**yaml.safe_load(Path(path).read_text()))
    # an empty mapping would merge into conf/hardware's table: null replaces it
    return [f"hardware.{k}={hydra_value(v if v != {} else None)}"
            for k, v in dataclasses.asdict(spec).items() if k != "name"]


def stage_sim(args, common, todo) -> None:
    """Every cell on the simulator, once per cost model (fitted: the calibration; roofline: the
    --roofline-hardware file; roofline_fitted: the calibration's own hardware file where there
    is one), and every real run replayed from its own steps (cost_model=replay); a replay that
    diverges leaves diverged.txt for the table instead of stopping the stage. Says (once) where
    a real run's decode attention split by another rule than the calibration prices."""
    models = {"fitted": ["cost_model=fitted", f"cost_model.path={args.calibration}"],
              "roofline": ["cost_model=roofline"]
              + (hardware_overrides(args.roofline_hardware) if args.roofline_hardware else [])}
    hw_file = Path(args.calibration).with_suffix(".hardware.yaml")
    if hw_file.is_file():
        models["roofline_fitted"] = ["cost_model=roofline"] + hardware_overrides(hw_file)
    notes = set()
    for cell in {c["dir"]: c for c in todo}.values():
        for model, over in models.items():
            run(compose_cfg(common + ["mode=sim"] + cell["overrides"] + over),
                args.out / "sim" / model / cell["dir"])
        fitted = load_run(args.out / "sim" / "fitted" / cell["dir"])
        for rep in range(args.repeats):
            real = args.out / "real" / cell["dir"] / f"r{rep}"
            if (real / "summary.json").is_file():
                notes.add(split_rule_note(load_run(real), fitted))
            if (real / "steps.parquet").is_file():
                try:
                    run(compose_cfg(common + ["mode=sim", "cost_model=replay",
                                              f"cost_model.path={real / 'steps.parquet'}"] + cell["overrides"]),
                        args.out / "replay" / cell["dir"] / f"r{rep}")
                except RuntimeError as e:     # diverged: recorded in the table, not fatal
                    (args.out / "replay" / cell["dir"] / f"r{rep}").mkdir(parents=True, exist_ok=True)
                    (args.out / "replay" / cell["dir"] / f"r{rep}" / "diverged.txt").write_text(str(e))
    for note in sorted(notes - {None}):
        print(note)


def hydra_value(v) -> str:
    """A value in Hydra's override grammar (mappings as {key:value,...}, e.g. the hardware
    file's attention_block_cost)."""
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if v is None:
        return "null"
    return str(v)     # a float's repr: inf reads back as infinity


def read_metrics(run_dir: Path) -> dict | None:
    f = run_dir / "summary.json"
    return json.loads(f.read_text())["metrics"] if f.is_file() else None


def stage_table(args, todo, capacity: dict | None = None) -> dict:
    """From what the real and sim stages wrote under --out: table.csv (cell x cost model x
    metric: real mean of the repeats, sim, error, the repeats' spread), effects.csv (each
    pair's measured against predicted change), equivalence.csv (each replay step for step),
    steps.csv, the figures (the capacity line at `capacity`, capacity.json's) and table.md;
    prints the markdown and returns the summary (its last line, as JSON)."""
    rows, effects, equivalence = [], [], []
    sim_models = sorted(p.name for p in (args.out / "sim").iterdir()) if (args.out / "sim").is_dir() else []
    seen = set()
    for cell in todo:
        reals = [m for r in range(args.repeats)
                 if (m := read_metrics(args.out / "real" / cell["dir"] / f"r{r}")) is not None]
        for r in range(args.repeats if cell["dir"] not in seen else 0):
            d = args.out / "replay" / cell["dir"] / f"r{r}"
            summary = d / "summary.json"
            if summary.is_file():
                eq = json.loads(summary.read_text()).get("equivalence") or {}
                equivalence.append({"cell": cell["dir"], "repeat": r, **eq})
            elif (d / "diverged.txt").is_file():
                equivalence.append({"cell": cell["dir"], "repeat": r, "diverged": (d / "diverged.txt").read_text()})
        seen.add(cell["dir"])
        for model in sim_models:
            sim = read_metrics(args.out / "sim" / model / cell["dir"])
            if sim is None or not reals:
                continue
            for metric in METRICS:
                values = np.array([m[metric] for m in reals], float)
                real = float(np.mean(values))
                rows.append({"cell": cell["name"], "group": cell["group"], "trace": cell["trace"], "load": cell["load"],
                             "below_capacity": cell["below_capacity"],
                             "pair": cell["pair"], "side": cell["side"], "cost_model": model,
                             "metric": metric, "real": real, "sim": sim[metric],
                             "error": (sim[metric] - real) / real if real else math.nan,
                             "real_spread": float((values.max() - values.min()) / real) if real else math.nan,
                             "repeats": len(values)})
    table = pd.DataFrame(rows)
    if not table.empty:
        paired = table[table["pair"].notna()]
        dirs = {c["name"]: c["dir"] for c in todo}
        intervals = {}     # (group, pair) -> sampling_interval of its real runs
        for (cell_base, model, metric, pair), g in paired.groupby(["group", "cost_model", "metric", "pair"]):
            if set(g["side"]) != {0, 1}:
                continue
            a, b = g[g["side"] == 0].iloc[0], g[g["side"] == 1].iloc[0]
            if (cell_base, pair) not in intervals:
                intervals[cell_base, pair] = sampling_interval(
                    *[[args.out / "real" / dirs[side["cell"]] / f"r{r}" for r in range(int(side["repeats"]))]
                      for side in (a, b)])
            effect = pair_effect(a, b, metric)
            interval = intervals[cell_base, pair][metric]
            effects.append({"cell": cell_base, "pair": pair, "cost_model": model, "metric": metric, **effect,
                            "sampling_lo": interval[0] if interval else math.nan,
                            "sampling_hi": interval[1] if interval else math.nan,
                            "within_sampling": bool(interval) and interval[0] <= effect["predicted_change"] <= interval[1]})
    effects = pd.DataFrame(effects)
    equivalence = pd.DataFrame(equivalence)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "table.csv", index=False)
    effects.to_csv(args.out / "effects.csv", index=False)
    equivalence.to_csv(args.out / "equivalence.csv", index=False)
    steps = step_costs(args, todo)
    steps.to_csv(args.out / "steps.csv", index=False)
    summary = summarize(table, effects, equivalence, steps)
    text = markdown(table, effects, equivalence, summary, steps) + figures(table, effects, args.out, capacity)
    (args.out / "table.md").write_text(text)
    print(text)
    print(json.dumps(summary))
    return summary


def figures(table: pd.DataFrame, effects: pd.DataFrame, out: Path,
            capacity: dict | None = None) -> str:
    """fidelity_vs_load.png (latency and throughput against load, real and every cost model,
    `capacity` (capacity.json's) marked) and, with pairs, fidelity_effects.png (predicted
    against measured changes) under `out`; returns the markdown that shows them."""
    from analysis.plots import fidelity_effects, fidelity_vs_load, save
    lines = []
    base = table[table["pair"].isna()] if not table.empty else table
    if not base.empty and base.groupby("trace")["load"].nunique().max() >= 2:   # a line needs two loads
        rps = {trace: c["capacity_rps"] for trace, c in (capacity or {}).items()}
        save(fidelity_vs_load(table, rps), out / "fidelity_vs_load.png")
        lines.append("![latency and throughput against load, real and simulated](fidelity_vs_load.png)")
    if not effects.empty:
        save(fidelity_effects(effects), out / "fidelity_effects.png")
        lines.append("![predicted against measured policy effects](fidelity_effects.png)")
    return "".join(f"\n{line}\n" for line in lines)


def step_costs(args, todo) -> pd.DataFrame:
    """The calibration on every real run's own steps (simulator.calibrate.step_errors): per
    run and step kind, n, mean and median error of the predicted device time, and the summed
    time's error (predicted / measured - 1). Each run is replayed first (strict) so its steps
    carry the calibration's plan features (experiments.plan_features); runs at a KV block size
    other than the profiled one are left out (the attention's block cost is the hardware
    file's, not the calibration's), as are runs that cannot be priced (`note` says why)."""
    from experiments.plan_features import plan_features, run_config
    from simulator import CudaGraphs
    from simulator.calibrate import step_errors
    from simulator.cost_model import profiled_block_size
    calib = json.loads(Path(args.calibration).read_text())
    plan, profiled_block = calib.get("decode_plan"), profiled_block_size(calib)
    rows, seen = [], set()
    for cell in todo:
        if cell["dir"] in seen:
            continue
        seen.add(cell["dir"])
        for r in range(args.repeats):
            run_dir = args.out / "real" / cell["dir"] / f"r{r}"
            if not (run_dir / "steps.parquet").is_file():
                continue
            base = {"cell": cell["dir"], "repeat": r}
            try:
                rc = run_config(run_dir)
                if rc.cache.block_size != profiled_block:
                    rows.append({**base, "note": f"block {rc.cache.block_size}, profiled at {profiled_block}"})
                    continue
                steps = plan_features(run_dir, plan) if plan else pd.read_parquet(run_dir / "steps.parquet")
                graphs = CudaGraphs.for_engine(rc.scheduler.max_num_seqs, rc.scheduler.max_num_batched_tokens,
                                               rc.engine.graph_limit)
                errors = step_errors(calib, graphs, steps)
            except (ValueError, RuntimeError) as e:
                rows.append({**base, "note": str(e).splitlines()[0]})
                continue
            rows += [{**base, "kind": kind, "n": e["n"], "mean_error": e["mean_error"],
                      "median_error": e["median_error"], "sum_error": e["predicted_s"] / e["measured_s"] - 1}
                     for kind, e in errors.items()]
    return pd.DataFrame(rows)


def pair_effect(a, b, metric: str) -> dict:
    """Configuration A -> B on one metric: the measured and predicted relative change, their
    distance in points, the sign test, the target (3 points, 5 for TTFT, same sign), and
    whether the measured change exceeds the spread of the repeats of either side (a change
    inside that noise has no meaningful sign). `a`, `b`: rows with real, sim, real_spread."""
    measured = (b["real"] - a["real"]) / a["real"]
    predicted = (b["sim"] - a["sim"]) / a["sim"]
    tolerance = 0.05 if "ttft" in metric else 0.03
    same_sign = bool(np.sign(measured) == np.sign(predicted))
    return {"measured_change": measured, "predicted_change": predicted,
            "difference_pp": 100 * (predicted - measured), "same_sign": same_sign,
            "within_target": same_sign and abs(predicted - measured) <= tolerance,
            "beyond_spread": bool(abs(measured) > max(a["real_spread"], b["real_spread"]))}


SAMPLING_DRAWS = 400     # paired bootstrap draws of a pair's requests (sampling_interval)
_STAT = {"mean": np.nanmean, "median": np.nanmedian,
         "p90": lambda x, axis: np.nanpercentile(x, 90, axis=axis),
         "p99": lambda x, axis: np.nanpercentile(x, 99, axis=axis)}


def _run_samples(run_dir: Path) -> dict:
    """A real run's completed requests by id: ttft, tpot (NaN with one output token), e2el
    (seconds) and each request's inter-token gaps, as analysis.metrics computes them."""
    from analysis.metrics import add_latencies, completed
    df = add_latencies(completed(pd.read_parquet(run_dir / "requests.parquet")).copy())
    return {rid: (r.ttft_s, r.tpot_s, r.e2el_s, np.diff(np.asarray(r.token_times_s, float)))
            for rid, r in zip(df["request_id"], df.itertuples())}


def sampling_interval(a_runs: list[Path], b_runs: list[Path], metrics=METRICS,
                      draws: int = SAMPLING_DRAWS, seed: int = 0) -> dict:
    """How much the measured change A -> B of each metric owes to which requests the trace
    happened to hold: the change measured again `draws` times on the requests drawn with
    replacement (one draw for both sides and every repeat: a pair replays one set of
    requests, so what the sides share cancels), each side the mean of its repeats as in the
    table; {metric: (5th, 95th percentile)}, None for the throughputs (a run's count over its
    duration: not a per-request sample). A predicted change inside the interval is as close
    as this many requests can tell."""
    runs = [[_run_samples(d) for d in side] for side in (a_runs, b_runs)]
    ids = sorted(set.intersection(*(set(r) for side in runs for r in side)))
    if not ids:
        raise ValueError(f"{a_runs[0].parent.name} -> {b_runs[0].parent.name}: no request completed "
                         "in every run of both sides")
    draw = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))
    pooled = {}    # (side, run) -> each draw's inter-token gaps, pooled (ragged: draw by draw)

    def side_values(s: int, column: int, stat: str) -> np.ndarray:
        per_run = []
        for k, r in enumerate(runs[s]):
            if column < 3:
                per_run.append(_STAT[stat](np.array([r[i][column] for i in ids], float)[draw], axis=1))
                continue
            if (s, k) not in pooled:
                gaps = [r[i][3] for i in ids]
                pooled[s, k] = [np.concatenate([gaps[j] for j in row]) for row in draw]
            per_run.append(np.array([_STAT[stat](g, axis=None) for g in pooled[s, k]]))
        return 1000.0 * np.mean(per_run, axis=0)
    out = {}
    for metric in metrics:
        if not metric.endswith("_ms"):
            out[metric] = None
            continue
        stat, name, _ = metric.split("_")
        column = ("ttft", "tpot", "e2el", "itl").index(name)
        a, b = side_values(0, column, stat), side_values(1, column, stat)
        lo, hi = np.percentile((b - a) / a, [5, 95])
        out[metric] = (float(lo), float(hi))
    return out


def within_targets(table: pd.DataFrame) -> pd.DataFrame:
    """The cells below capacity (pairs aside), per cost model and trace: how many (cell,
    metric) errors of TARGETS' metrics are within target (the fitted model's TARGETS, any
    roofline model's ROOFLINE_TARGET) out of how many."""
    base = table[table["pair"].isna() & table["below_capacity"] & table["metric"].isin(list(TARGETS))]
    if base.empty:
        return pd.DataFrame(columns=["cost_model", "trace", "within", "of"])
    tolerance = np.where(base["cost_model"] == "fitted", base["metric"].map(TARGETS), ROOFLINE_TARGET)
    base = base.assign(within=base["error"].abs() <= tolerance)
    rows = [{"cost_model": m, "trace": t, "within": int(g["within"].sum()), "of": len(g)}
            for (m, t), g in base.groupby(["cost_model", "trace"])]
    rows += [{"cost_model": m, "trace": "all", "within": int(g["within"].sum()), "of": len(g)}
             for m, g in base.groupby("cost_model")]
    return pd.DataFrame(rows)


def summarize(table, effects, equivalence, steps: pd.DataFrame | None = None) -> dict:
    out = {}
    if not table.empty:
        within = within_targets(table)
        out["within_target_up_to_capacity"] = {r.cost_model: f"{r.within}/{r.of}"
                                               for r in within[within["trace"] == "all"].itertuples()}
        base = table[table["pair"].isna() | (table["side"] == 0)]
        for model, g in base.groupby("cost_model"):   # the largest |error| over the cells
            out[f"{model}_max_abs_error"] = {m: round(float(g[g["metric"] == m]["error"].abs().max()), 4)
                          for m in ("request_throughput", "mean_ttft_ms", "p90_ttft_ms",
                                    "mean_tpot_ms", "mean_e2el_ms") if (g["metric"] == m).any()}
        out["max_real_spread"] = round(float(table["real_spread"].max()), 4)
    if not effects.empty:
        out["effects_within_target"] = {m: f"{int(g['within_target'].sum())}/{len(g)}"
                                        for m, g in effects.groupby("cost_model")}
        clear = effects[effects["beyond_spread"]]   # changes larger than the repeats' noise
        out["effects_beyond_spread_within_target"] = {m: f"{int(g['within_target'].sum())}/{len(g)}"
                                                      for m, g in clear.groupby("cost_model")}
        if "within_sampling" in effects.columns:     # misses inside the requests' sampling interval
            out["effects_missed_within_sampling"] = {
                m: f"{int((~g['within_target'] & g['within_sampling']).sum())}/{int((~g['within_target']).sum())}"
                for m, g in effects.groupby("cost_model")}
    if not equivalence.empty:
        def identical(r) -> bool:
            if isinstance(r.get("diverged"), str):
                return False
            return r.get("requests_identical") == r.get("requests")
        ok = equivalence.apply(identical, axis=1)
        out["replays_identical"] = f"{int(ok.sum())}/{len(equivalence)}"
    if steps is not None and "kind" in steps.columns:   # the fitted model's device time, all runs' steps
        priced = steps[steps["kind"].notna()]
        out["fitted_step_sum_error"] = {k: [round(float(g["sum_error"].min()), 4), round(float(g["sum_error"].max()), 4)]
                                        for k, g in priced.groupby("kind")}
    return out


def md(df: pd.DataFrame, index: bool = True) -> str:
    """A pipe table (pandas' to_markdown needs tabulate, not a dependency here)."""
    df = df.reset_index() if index else df
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)   # noqa: E731
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def markdown(table, effects, equivalence, summary, steps: pd.DataFrame | None = None) -> str:
    lines = ["# Fidelity: simulator vs engine", "", "error = (sim - real) / real; spread = "
             "(max - min) / mean of the real repeats.", ""]
    if not table.empty:
        key = ["request_throughput", "mean_ttft_ms", "p90_ttft_ms", "mean_tpot_ms", "p90_tpot_ms", "mean_e2el_ms"]
        wide = table[table["metric"].isin(key)].pivot_table(
            index=["cell", "cost_model"], columns="metric", values="error").reindex(columns=key)
        spread = table[table["metric"].isin(key)].pivot_table(index="cell", columns="metric",
                                                               values="real_spread").reindex(columns=key)
        lines += ["## Errors", "", md(100 * wide), "", "## Spread of the real repeats (%)", "",
                  md(100 * spread), ""]
        within = within_targets(table)
        if not within.empty:
            lines += ["## Within target up to capacity (cells below it, pairs aside: the fitted model "
                      "within 2% on throughput and mean / median / p90 TPOT and E2E, 5% on TTFT; "
                      "roofline models within 15%)", "",
                      md(within.pivot_table(index="trace", columns="cost_model", values="within", aggfunc="sum")
                         .astype(int).astype(str) + " / " +
                         within.pivot_table(index="trace", columns="cost_model", values="of", aggfunc="sum")
                         .astype(int).astype(str)), ""]
    if not effects.empty:
        key = effects[effects["metric"].isin(["request_throughput", "mean_ttft_ms", "p90_ttft_ms", "mean_tpot_ms"])]
        lines += ["## Policy effects (change B vs A, %)", "",
                  md(key.assign(measured=100 * key["measured_change"], predicted=100 * key["predicted_change"],
                                **({"sampling_90": [f"{100 * lo:+.1f}..{100 * hi:+.1f}" if lo == lo else "-"
                                                    for lo, hi in zip(key["sampling_lo"], key["sampling_hi"])]}
                                   if "sampling_lo" in key.columns else {}))[
                      ["cell", "pair", "cost_model", "metric", "measured", "predicted", "same_sign", "within_target"]
                      + (["sampling_90", "within_sampling"] if "sampling_lo" in key.columns else [])
                  ], index=False), "",
                  "sampling_90: the 5-95% interval of the measured change over the requests drawn "
                  "again with replacement (one draw for both sides: sampling_interval); "
                  "within_sampling: the prediction lies inside it.", ""]
    if not equivalence.empty:
        lines += ["## Step-for-step replay of every real run", "", md(equivalence, index=False), ""]
    if steps is not None and not steps.empty:
        shown = steps.copy()
        for c in ("mean_error", "median_error", "sum_error"):
            if c in shown.columns:
                shown[c] = 100 * shown[c]
        lines += ["## The fitted model on the real runs' own steps (device time error, %)", "",
                  md(shown, index=False), ""]
    lines += ["```", json.dumps(summary, indent=1), "```", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="conf/model/<name>")
    ap.add_argument("--hardware", required=True, help="conf/hardware/<name> (the roofline's)")
    ap.add_argument("--roofline-hardware", default=None, metavar="FILE",
                    help="hardware YAML of the `roofline` row (default: conf/hardware/<--hardware>.yaml); "
                         "e.g. the file fitted without this model (python -m simulator.hardware_fit "
                         "--leave-one-out), so the row is the estimate for a model never profiled")
    ap.add_argument("--calibration", required=True, help="calibration JSON (python run.py experiment=calibrate)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--traces", default="sharegpt,azure_conv,mooncake_conv", type=lambda s: s.split(","))
    ap.add_argument("--loads", default="0.25,0.5,0.8,1.1", type=lambda s: [float(x) for x in s.split(",")],
                    help="offered loads as fractions of the predicted capacity")
    ap.add_argument("--rates", default=None, type=lambda s: [float(x) for x in s.split(",")],
                    help="absolute offered loads, requests/s (instead of --loads)")
    ap.add_argument("--num-requests", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pairs", default="policy,budget,block_size,prefix_caching",
                    type=lambda s: [p for p in s.split(",") if p])
    ap.add_argument("--pressure-tokens", type=int, default=65536,
                    help="KV pool (tokens) of the block_size pair: memory pressure")
    ap.add_argument("--stages", default="capacity,real,sim,table", type=lambda s: s.split(","))
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every run")
    ap.add_argument("--force", action="store_true", help="rerun real cells that already have results")
    args = ap.parse_args(argv)
    if args.roofline_hardware:
        try:
            hardware_overrides(args.roofline_hardware)
        except (OSError, TypeError, ValueError) as e:
            sys.exit(f"--roofline-hardware {args.roofline_hardware}: {e}")
    bad = [p for p in args.pairs if p not in PAIRS]
    if bad:
        sys.exit(f"unknown pairs {bad}; choose from {list(PAIRS)}")
    common = [f"model={args.model}", f"hardware={args.hardware}", "logger=none", "progress=false"] + args.set
    args.out.mkdir(parents=True, exist_ok=True)
    capacity_file = args.out / "capacity.json"
    if "capacity" in args.stages:
        capacity = stage_capacity(args, common)
    elif capacity_file.is_file():
        capacity = json.loads(capacity_file.read_text())
    elif args.rates:
        capacity = {t: {"capacity_rps": max(args.rates),
                        "native_rps": native_rate(common, t, args.num_requests) if t in TIMED_TRACES else None}
                    for t in args.traces}
    else:
        sys.exit(f"{capacity_file} not found: run the capacity stage or give --rates")
    todo = cells(args, capacity, common)
    (args.out / "cells.json").write_text(json.dumps(todo, indent=1))
    print(f"{len(todo)} cells x {args.repeats} real repeats")
    if "real" in args.stages:
        stage_real(args, common, todo)
    if "sim" in args.stages:
        stage_sim(args, common, todo)
    if "table" in args.stages:
        stage_table(args, todo, capacity)


if __name__ == "__main__":
    main()
