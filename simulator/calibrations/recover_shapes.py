"""Give a profile recorded before `experiments.calibrate` kept each row's grid shape its
`shape` column (and so every feature computed from shapes, `decode_split_seqs` among them).

The grid is deterministic in the engine settings, so the shapes are those of the grid code
at the commit that profiled it (the calibration's engine_commit, read from git history).
Every row is checked against its shape: the features the profile recorded must come out
the same under the calibration's decode plan (decode_distinct_context_tokens excepted: it
also counts blocks a pool of the engine's size wraps around to, and the pool size is not
recorded). The profile is rewritten with `shape` and the plan features it lacks added
(`simulator.calibrate.with_plan_features`: decode_split_seqs), nothing else changed.

    python -m simulator.calibrations.recover_shapes simulator/calibrations/<name>.profile.parquet ...
"""
import argparse
import importlib.util
import json
import subprocess
import tempfile
from pathlib import Path

import pandas as pd

from policy.decode_plan import DecodePlan
from simulator.calibrate import with_plan_features
from simulator.profile_grid import shape_batch
from simulator.cost_model import CudaGraphs

CHECKED = ("num_seqs", "num_batched_tokens", "num_prefill_tokens", "num_decode_seqs", "num_sampled",
           "decode_context_tokens", "prefill_context_tokens", "prefill_kv_tokens",
           "prefill_attention_pairs", "max_context_tokens", "decode_span_tokens")


def grid_at(commit: str, meta: dict) -> list[dict]:
    """The profile grid (MoE shapes included for a MoE calibration) as `commit` made it."""
    source = subprocess.run(["git", "show", f"{commit}:simulator/calibrate.py"], capture_output=True,
                            text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"calibrate_{commit[:12]}.py"
        path.write_text(source)
        spec = importlib.util.spec_from_file_location(path.stem, path)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
    e = meta["engine"]
    S, M, L = e["max_num_seqs"], e["max_num_batched_tokens"], e["max_model_len"]
    graphs = CudaGraphs.for_engine(S, M, e["cuda_graph_max_tokens"])
    grid = old.profile_grid(S, M, L, graphs)
    if meta.get("moe"):
        grid += old.moe_grid(S, M, L, graphs, meta["moe"]["num_experts"], meta["moe"]["top_k"])
    return grid


def recover(profile_path: str) -> None:
    profile = pd.read_parquet(profile_path)
    if "shape" in profile.columns:
        print(f"{profile_path}: has its shapes already")
        return
    meta = json.loads(Path(profile_path.replace(".profile.parquet", ".json")).read_text())
    grid = grid_at(meta["engine_commit"], meta)
    if len(grid) != len(profile):
        raise SystemExit(f"{profile_path}: {len(profile)} rows, but the grid of {meta['engine_commit']} "
                         f"has {len(grid)} shapes: not the grid it was profiled on")
    e = meta["engine"]
    graphs = CudaGraphs.for_engine(e["max_num_seqs"], e["max_num_batched_tokens"], e["cuda_graph_max_tokens"])
    plan = DecodePlan(decode_graph_sizes=tuple(graphs.decode), **meta["decode_plan"])
    for i, (point, row) in enumerate(zip(grid, profile.to_dict("records"))):
        f = shape_batch(point["shape"], e["block_size"], 1 << 20, plan).features()
        differ = [c for c in CHECKED if c in row and f[c] != row[c]]
        differ += [c for c in ("split", "grid") if c in row and point.get(c, "base") != row[c]]
        if differ:
            raise SystemExit(f"{profile_path}: row {i} differs from its grid shape in {differ}")
    print(f"{profile_path}: {len(profile)} rows match the grid of {meta['engine_commit'][:7]} "
          f"({len(CHECKED)} features each)")
    profile = with_plan_features(profile.assign(shape=[json.dumps(p["shape"]) for p in grid]), meta)
    profile.to_parquet(profile_path, index=False)
    print(f"wrote {profile_path} with its shapes")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profiles", nargs="+", help="<name>.profile.parquet, next to its <name>.json")
    for path in ap.parse_args(argv).profiles:
        recover(path)


if __name__ == "__main__":
    main()
