"""How well the uncalibrated roofline predicts real engine runs, per hardware file: each real
run (a mode=gpu run directory) re-simulated with cost_model=roofline and the run's own
config, and each of its steps priced by the roofline against the device time it measured.

    python benchmarks/roofline_transfer.py --out /tmp/transfer \\
        --hardware datasheet=<datasheet yaml> --hardware joint=conf/hardware/h200.yaml \\
        --leave-one-out <dir of python -m simulator.hardware_fit --leave-one-out> \\
        RUN_DIR [RUN_DIR ...]

`--hardware LABEL=FILE` (repeatable): a hardware YAML used for every run; `--leave-one-out
DIR`: for each run the file fitted without that run's model (DIR/<gpu>-without-<model>.yaml),
labelled "leave-one-out". Prints per run and hardware file the error (sim - real) / real
of throughput and mean / p50 / p90 TTFT, TPOT and E2E latency, and the mean error of the
roofline on the run's decode and mixed steps, then the mean |error| over the runs and by
model, and per cell (a fidelity cell's repeats <cell>/r<k> averaged) how many of its 10
metrics are off by more than --target (default 0.15, issue 10's roofline target); ends with
one JSON line. Simulated runs go to --out/<label>/<model>/<run name>.
Runs on a CPU in seconds per run.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from experiments.config import Config  # noqa: E402
from experiments.replay import run  # noqa: E402
from simulator.cost_model import CudaGraphs, ModelSpec, RooflineCostModel  # noqa: E402
from simulator.hardware import HardwareSpec  # noqa: E402

METRICS = ["request_throughput"] + [f"{s}_{m}_ms" for m in ("ttft", "tpot", "e2el") for s in ("mean", "median", "p90")]
SHORT = {"request_throughput": "thr", "mean_ttft_ms": "TTFT", "median_ttft_ms": "TTFT50", "p90_ttft_ms": "TTFT90",
         "mean_tpot_ms": "TPOT", "median_tpot_ms": "TPOT50", "p90_tpot_ms": "TPOT90",
         "mean_e2el_ms": "E2E", "median_e2el_ms": "E2E50", "p90_e2el_ms": "E2E90"}


def run_name(run_dir: Path) -> str:
    """A short unique name: the last two path parts (fidelity runs end in <cell>/r<k>)."""
    return "_".join(run_dir.parts[-2:]) if run_dir.name.startswith("r") and run_dir.name[1:].isdigit() else run_dir.name


def hardware_for(label: str, source, config: dict) -> dict:
    """The hardware YAML's fields for this run: `source` is a file, or a leave-one-out folder
    (the file fitted without the run's model)."""
    path = Path(source)
    if path.is_dir():
        model = config["model"]["name"]
        path = path / f"{config['hardware']['name']}-without-{model}.yaml"
        if not path.is_file():
            sys.exit(f"{label}: no {path} (python -m simulator.hardware_fit --leave-one-out writes it)")
    fields = yaml.safe_load(path.read_text())
    HardwareSpec(**fields)     # refuses a bad file before any run
    return fields


def simulate(config: dict, hardware: dict, out: Path) -> dict:
    """The run's config replayed on the simulator with the roofline and `hardware`."""
    cfg = dict(config, mode="sim", progress=False, hardware=hardware,
               cost_model={"kind": "roofline", "path": None, "strict": True},
               logger=dict(config.get("logger", {}), kind="none"),
               engine=dict(config["engine"], model_path=None))   # the model: config["model"]
    return run(OmegaConf.merge(OmegaConf.structured(Config), cfg), out)


def step_errors(run_dir: Path, config: dict, hardware: dict) -> dict:
    """{kind: mean (predicted - measured) / measured} of the roofline on the run's own steps."""
    steps = pd.read_parquet(run_dir / "steps.parquet")
    steps = steps[steps["device_s"].notna() & (steps["num_seqs"] > 0) & (steps["device_s"] > 0)]
    if "decode_distinct_context_tokens" not in steps.columns:
        steps = steps.assign(decode_distinct_context_tokens=steps["decode_context_tokens"])
    model = ModelSpec.from_hf_config(config["model"]["hf_config"], name=config["model"]["name"])
    e, s = config["engine"], config["scheduler"]
    graphs = CudaGraphs.for_engine(s["max_num_seqs"], s["max_num_batched_tokens"],
                                   0 if e.get("enforce_eager") else e["cuda_graph_max_tokens"])
    cost = RooflineCostModel(model, HardwareSpec(**hardware), int(e.get("tensor_parallel_size") or 1), graphs,
                             block_size=config["cache"]["block_size"], pdl_max_tokens=int(e.get("pdl_max_tokens") or 0))
    rows = steps.to_dict("records")
    pred = np.array([cost.predict(r) for r in rows])
    err = (pred - steps["device_s"].to_numpy(float)) / steps["device_s"].to_numpy(float)
    kinds = np.array([graphs.rows(r)[0] for r in rows])
    return {k: float(err[kinds == k].mean()) for k in sorted(set(kinds))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path, help="real (mode=gpu) run directories")
    ap.add_argument("--hardware", action="append", default=[], metavar="LABEL=FILE",
                    help="a hardware YAML to simulate every run with (repeatable)")
    ap.add_argument("--leave-one-out", default=None, metavar="DIR",
                    help="folder of <gpu>-without-<model>.yaml (python -m simulator.hardware_fit --leave-one-out)")
    ap.add_argument("--out", required=True, type=Path, help="where the simulated runs go")
    ap.add_argument("--target", type=float, default=0.15, help="|error| a metric must stay within (0.15)")
    args = ap.parse_args(argv)
    sources = {}
    for item in args.hardware:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            sys.exit(f"--hardware {item!r}: give LABEL=FILE with an existing file")
        sources[label] = path
    if args.leave_one_out:
        if not Path(args.leave_one_out).is_dir():
            sys.exit(f"--leave-one-out {args.leave_one_out}: not a folder")
        sources["leave-one-out"] = args.leave_one_out
    if not sources:
        sys.exit("give --hardware LABEL=FILE and/or --leave-one-out DIR")
    rows = []
    for run_dir in args.runs:
        summary = run_dir / "summary.json"
        if not summary.is_file() or not (run_dir / "steps.parquet").is_file():
            sys.exit(f"{run_dir}: not a run directory (no summary.json / steps.parquet)")
        real = json.loads(summary.read_text())
        if real.get("mode") != "gpu":
            sys.exit(f"{run_dir}: not a real run (mode {real.get('mode')!r})")
        config = real["config"]
        for label, source in sources.items():
            hardware = hardware_for(label, source, config)
            sim = simulate(config, hardware, args.out / label / config["model"]["name"] / run_name(run_dir))
            row = {"run": run_name(run_dir), "cell": run_dir.parent.name if run_dir.name[1:].isdigit() else run_dir.name,
                   "model": config["model"]["name"], "hardware": label}
            row |= {m: (sim[m] - real["metrics"][m]) / real["metrics"][m] for m in METRICS}
            row |= {f"step_{k}": v for k, v in step_errors(run_dir, config, hardware).items()}
            rows.append(row)
    table = pd.DataFrame(rows)
    shown = table.drop(columns="cell").rename(columns=SHORT)
    numeric = [c for c in shown.columns if c not in ("run", "model", "hardware")]
    shown[numeric] = (100 * shown[numeric]).round(1)
    print("error (sim - real) / real, %; step_<kind>: the roofline's mean error on the run's own steps")
    print(shown.to_string(index=False))
    summary = {label: {m: round(float(g[m].abs().mean()), 4) for m in METRICS + [c for c in table.columns if c.startswith("step_")]}
               for label, g in table.groupby("hardware", sort=False)}
    print("mean |error| over the runs:")
    print((100 * pd.DataFrame(summary).T.rename(columns=SHORT)).round(1).to_string())
    by_model = table.drop(columns=["run", "cell"]).set_index(["model", "hardware"]).abs().groupby(level=[0, 1], sort=False).mean()
    print("mean |error| by model:")
    print((100 * by_model.rename(columns=SHORT)).round(1).to_string())
    cells = table.groupby(["model", "cell", "hardware"], sort=False)[METRICS].mean()
    off = (cells.abs() > args.target).sum(axis=1)
    print(f"per cell (mean over its repeats): metrics of {len(METRICS)} off by more than {args.target:.0%}, "
          "and the worst |error|, %:")
    print(pd.DataFrame({"off": off, "worst": (100 * cells.abs().max(axis=1)).round(1)}).unstack("hardware").to_string())
    print(json.dumps({"mean_abs_error": summary,
                      "metrics_off_target": {label: int(g.sum()) for label, g in off.groupby(level="hardware", sort=False)}}))


if __name__ == "__main__":
    main()
