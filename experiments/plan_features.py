"""A real run's steps with the split-KV plan's features (`decode_span_tokens`,
`decode_split_seqs`, `decode_work_items`) under a calibration's plan, and the longest prompt
chunk's context (`prefill_max_context_tokens`), for a run recorded before the engine logged
them: a step record holds counts, not each sequence's context, so the simulator replays the
run (cost_model=replay, strict: every step's composition must be the recorded one) with the
calibration's `decode_plan`, and its step records, batch for batch the engine's, carry the
features. The recorded steps are written back with them, so `python -m simulator.calibrate
... --check-steps <out>` can check a calibration that prices them.

    python -m experiments.plan_features <run dir> --calibration <file>.json --out <steps.parquet>

The run directory is any run's output (`run.py`'s, or a `benchmarks/fidelity/run_fidelity.py`
cell's `real/<cell>/r<k>`): `steps.parquet` and `summary.json`, whose `config` (the run's whole
resolved config) gives the trace and the policy settings to replay.
"""
import argparse
import json
import sys
from pathlib import Path

import pandas as pd
from omegaconf.errors import OmegaConfBaseException

from experiments.config import build, recorded_config
from experiments.replay import load_requests, recorded_num_blocks
from policy.decode_plan import DecodePlan
from simulator import CudaGraphs, ModelSpec, Simulator
from simulator.cost_model import PLAN_FEATURES, PREFILL_MAX_FEATURE, ReplayCostModel

REPLAYED = PLAN_FEATURES + (PREFILL_MAX_FEATURE,)   # what the replay's batches give a step record


def run_config(run_dir: Path):
    """The run's config (its summary.json's, as it ran) as a simulated replay of its own
    steps. Raises ValueError if the directory holds no run or its config no longer composes."""
    summary, steps = run_dir / "summary.json", run_dir / "steps.parquet"
    if not summary.is_file() or not steps.is_file():
        raise ValueError(f"{run_dir}: not a run directory (it needs summary.json and steps.parquet)")
    config = json.loads(summary.read_text()).get("config")
    if not config:
        raise ValueError(f"{summary} records no config")
    replay = {"mode": "sim", "progress": False, "logger": dict(config.get("logger", {}), kind="none"),
              "cost_model": {"kind": "replay", "path": str(steps), "strict": True},
              "engine": dict(config.get("engine", {}), model_path=None)}   # the model: config["model"]
    try:
        cfg = recorded_config(config, replay)
    except OmegaConfBaseException as e:
        raise ValueError(f"{summary}: its config does not fit this code's ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from e
    return build(cfg)


def plan_features(run_dir: Path, plan: dict) -> pd.DataFrame:
    """The run's steps.parquet with PLAN_FEATURES computed under `plan` (a calibration's
    decode_plan). Raises RuntimeError if the replay diverges, ValueError if a recorded
    decode_span_tokens differs from the plan's (the run's engine planned otherwise)."""
    rc = run_config(run_dir)
    model = ModelSpec.from_hf_config(rc.hf_config, name=rc.model_name)
    num_blocks = recorded_num_blocks(rc)
    if not num_blocks:
        raise ValueError(f"{run_dir}: summary.json records no run.num_blocks (the KV pool the engine had)")
    graphs = CudaGraphs.for_engine(rc.scheduler.max_num_seqs, rc.scheduler.max_num_batched_tokens,
                                   rc.engine.graph_limit)
    cost = ReplayCostModel.load(run_dir / "steps.parquet", strict=True)
    cost.decode_plan = DecodePlan(decode_graph_sizes=tuple(graphs.decode), **plan)
    sim = Simulator(rc.scheduler, rc.cache, cost, num_blocks, seed=rc.seed,
                    async_scheduling=rc.engine.async_on)
    result = sim.run(load_requests(rc, model.vocab_size))
    steps = pd.read_parquet(run_dir / "steps.parquet")
    steps = steps.sort_values("step", kind="stable").reset_index(drop=True) if "step" in steps else steps
    made = pd.DataFrame(result.steps)
    if len(made) != len(steps):
        raise RuntimeError(f"{run_dir}: the replay formed {len(made)} steps, the run recorded {len(steps)}")
    for f in REPLAYED:
        if f in steps.columns and not (steps[f].to_numpy() == made[f].to_numpy()).all():
            why = ("the calibration's plan's: the run's engine planned its decodes otherwise"
                   if f in PLAN_FEATURES else "the replay's: its steps held other prompt chunks")
            raise ValueError(f"{run_dir}: the recorded {f} differs from {why}")
    return steps.assign(**{f: made[f].to_numpy() for f in REPLAYED})


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a run.py output directory of a real (mode=gpu) run")
    ap.add_argument("--calibration", required=True, help="the calibration JSON whose decode_plan to plan with")
    ap.add_argument("--out", required=True, help="steps.parquet to write")
    args = ap.parse_args(argv)
    plan = json.loads(Path(args.calibration).read_text()).get("decode_plan")
    if not plan:
        sys.exit(f"{args.calibration} has no decode_plan (it prices no plan feature)")
    try:
        steps = plan_features(Path(args.run), plan)
    except (ValueError, RuntimeError) as e:
        sys.exit(str(e))
    steps.to_parquet(args.out)
    print(f"wrote {args.out}: {len(steps)} steps, every one replayed as recorded, with "
          + ", ".join(PLAN_FEATURES))


if __name__ == "__main__":
    main()
