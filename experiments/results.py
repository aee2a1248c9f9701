"""Result files of one run (DESIGN.md "Results"): requests.parquet, steps.parquet and
summary.json, the same whichever executor produced them.

All times are seconds on the replay's clock: 0 is the start of the replay.
"""
import json
import math
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import pandas as pd

from analysis.metrics import add_latencies

REQUEST_COLUMNS = ("request_id", "replica", "arrival_s", "first_scheduled_s", "first_token_s",
                   "finish_s", "prompt_len", "output_len", "cached_prompt_tokens",
                   "num_preemptions", "token_times_s", "finish_reason")


def _shift(t, t0: float):
    return math.nan if t is None else t - t0


def request_table(sequences, replica_of: dict | None = None, t0: float = 0.0) -> pd.DataFrame:
    """One row per policy Sequence, in the given order; `t0` is subtracted from every
    timestamp (the executor's clock at the start of the replay)."""
    replica_of = replica_of or {}
    rows = [{"request_id": str(seq.seq_id), "replica": replica_of.get(seq.seq_id, 0),
             "arrival_s": seq.arrival_time - t0,
             "first_scheduled_s": _shift(seq.first_scheduled_time, t0),
             "first_token_s": _shift(seq.first_token_time, t0),
             "finish_s": _shift(seq.finish_time, t0),
             "prompt_len": seq.num_prompt_tokens, "output_len": seq.num_output_tokens,
             "cached_prompt_tokens": seq.num_cached_tokens,
             "num_preemptions": seq.num_preemptions,
             "token_times_s": [t - t0 for t in seq.token_times],
             "finish_reason": seq.finish_reason}
            for seq in sequences]
    table = pd.DataFrame(rows, columns=list(REQUEST_COLUMNS))
    return add_latencies(table)


def step_table(steps: list[dict], num_blocks: int, t0: float = 0.0) -> pd.DataFrame:
    """`Batch.record` rows (+ replica, step) with `kv_usage` = kv_blocks_used / num_blocks."""
    table = pd.DataFrame(steps)
    if table.empty:
        return table
    table["start_s"] = table["start_s"] - t0
    for column in ("replica", "step"):
        if column not in table:
            table[column] = 0 if column == "replica" else range(len(table))
    table["kv_usage"] = table["kv_blocks_used"] / num_blocks
    return table


def _calibration_note(path) -> str:
    """' (EXAMPLE, not a measurement)' for a calibration file that says it is an example."""
    try:
        calib = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return ""
    example = "EXAMPLE" in str(calib.get("source", "")) or Path(path).name.startswith("example")
    return f", device {calib.get('device')!r}" + (" (EXAMPLE, not a measurement)" if example
                                                   else "")


def backend(rc, gpu: str | None = None) -> str:
    """What produced the numbers, in one line: the simulator with its cost model and
    hardware, or the engine with its device. `rc`: the run's RunConfig."""
    tp = rc.engine.tensor_parallel_size
    if rc.mode == "sim":
        cost = rc.cost_model
        if cost.kind == "roofline":
            model = "roofline cost model"
        elif cost.kind == "fitted":
            model = f"fitted cost model {cost.path}{_calibration_note(cost.path)}"
        else:    # the recorded run's hardware, whatever conf/hardware says
            return f"simulator: step times replayed from {cost.path}, {rc.model_name}"
        replicas = rc.cluster.num_replicas
        cluster = (f", {replicas} replicas ({rc.cluster.router})" if replicas > 1 else "")
        return (f"simulator: {model}, {rc.model_name} on {rc.hardware.name} (tp={tp}"
                f"{cluster})")
    device = gpu or rc.engine.device
    return (f"engine: {rc.model_name} on {device} (dtype {rc.engine.dtype}, tp={tp}, "
            f"attention {rc.engine.attention_backend})")


def load(trace) -> dict:
    """The configured load: arrival process and rate (`trace`: the run's TraceConfig)."""
    arrival = trace.arrival or trace.default_arrival
    out = {"trace": trace.name, "arrival": arrival, "request_rate": None,
           "time_scale": None, "num_requests": trace.num_requests}
    if arrival == "trace":
        out["time_scale"] = trace.time_scale
        out["text"] = f"{trace.name}, the trace's own timestamps x {trace.time_scale:g}"
    elif arrival == "burst":
        out["text"] = f"{trace.name}, every request at t=0 (burst)"
    else:
        out["request_rate"] = trace.request_rate
        shape = f"gamma (cv={trace.cv:g})" if arrival == "gamma" else arrival
        out["text"] = f"{trace.name}, {shape} arrivals at {trace.request_rate:g} req/s"
    return out


def commit() -> str | None:
    """The repository's commit, with "-dirty" when the working tree has changes, or
    $TWINSERVE_COMMIT where it is set (a copy of the tree sent to a GPU machine, whose .git,
    if any, is not the tree's); None without either."""
    if os.environ.get("TWINSERVE_COMMIT"):
        return os.environ["TWINSERVE_COMMIT"]
    repo = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=repo, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=repo, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) or None


def versions() -> dict:
    """Versions of what produced the numbers (None where not installed); `git`: `commit()`."""
    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "twinserve": version("twinserve"),
            "git": commit(), "simpy": version("simpy"), "torch": version("torch")}


def _json_safe(value):
    """NaN and inf are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write(out_dir, requests: pd.DataFrame, steps: pd.DataFrame, summary: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    requests.to_parquet(out_dir / "requests.parquet", index=False)
    steps.to_parquet(out_dir / "steps.parquet", index=False)
    (out_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
