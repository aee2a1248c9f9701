"""Fit a `FittedCostModel` calibration file on a real run's step log.

    python -m simulator.calibrate outputs/<run>/steps.parquet --out calib.json \\
        --model qwen3-0.6b --device "NVIDIA H100 80GB HBM3" --command "<the run's command>" \\
        [--engine-commit <sha>] [--tp 1] [--source "<what the steps came from>"]

Decode-only steps and steps with prefill tokens get separate linear models (least squares,
non-negative coefficients). Prints each regime's fit (MAPE, R^2) and writes the JSON.
"""
import argparse
import json
import sys

import pandas as pd

from simulator.cost_model import fit_calibration


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("steps", help="a run's steps.parquet (one replica)")
    ap.add_argument("--out", required=True, help="calibration JSON to write")
    ap.add_argument("--model", required=True, help="model name, as conf/model/<name>.yaml")
    ap.add_argument("--device", required=True, help="GPU name (torch.cuda.get_device_name)")
    ap.add_argument("--command", required=True, help="the exact command that produced the steps")
    ap.add_argument("--engine-commit", default=None, help="git commit of the engine build")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--source", default="engine steps.parquet", help="what the steps came from")
    args = ap.parse_args(argv)
    steps = pd.read_parquet(args.steps)
    if "replica" in steps.columns and steps["replica"].nunique() > 1:
        sys.exit(f"{args.steps}: holds several replicas; calibrate on one")
    calib = fit_calibration(steps, {"model": args.model, "device": args.device, "tp": args.tp,
                                    "command": args.command, "engine_commit": args.engine_commit,
                                    "source": args.source})
    with open(args.out, "w") as f:
        json.dump(calib, f, indent=2)
        f.write("\n")
    for regime, r in calib["regimes"].items():
        fit = r["fit"]
        print(f"{regime:<7} n={fit['n_steps']:<7} MAPE={100 * fit['mape']:.2f}%  "
              f"p90 APE={100 * fit['p90_ape']:.2f}%  R^2={fit['r2']:.4f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
