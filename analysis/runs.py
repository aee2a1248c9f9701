"""Reading result directories: one run = a folder with summary.json, requests.parquet and
steps.parquet (as `run.py` writes them); a sweep = a folder holding several runs.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

HEADLINE = ("request_throughput", "output_throughput", "median_ttft_ms", "p99_ttft_ms",
            "median_tpot_ms", "p99_tpot_ms", "p99_itl_ms", "num_preemptions")


@dataclass(frozen=True, slots=True)
class Run:
    path: Path
    summary: dict       # summary.json: config, metrics, versions, gpu, mode

    @property
    def config(self) -> dict:
        return self.summary["config"]

    @property
    def metrics(self) -> dict:
        return self.summary["metrics"]

    @property
    def name(self) -> str:
        return self.path.name

    def requests(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "requests.parquet")

    def steps(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "steps.parquet")


def load_run(path) -> Run:
    path = Path(path)
    summary_file = path / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{path} is not a run directory: no summary.json in it")
    return Run(path, json.loads(summary_file.read_text()))


def find_runs(*paths) -> list[Run]:
    """Every run under the given paths (a run dir, or any folder containing run dirs), in
    path order. Raises if a path holds no run."""
    runs = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        found = sorted({f.parent for f in path.rglob("summary.json")}, key=_natural_key)
        if not found:
            raise FileNotFoundError(f"no run (a folder with summary.json) under {path}")
        runs += [load_run(p) for p in found]
    return runs


def _natural_key(path: Path):
    # multirun job folders are 0, 1, ..., 10: sort 2 before 10.
    return [int(part) if part.isdigit() else part for part in path.parts]


def flatten(d: dict, prefix: str = "") -> dict:
    """{"cache": {"block_size": 16}} -> {"cache.block_size": 16}; lists become tuples."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= flatten(value, name + ".")
        else:
            out[name] = tuple(value) if isinstance(value, list) else value
    return out


def varying_keys(runs: list[Run]) -> list[str]:
    """The config keys (dotted) whose values differ between runs: what a sweep swept."""
    configs = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*configs)) if configs else []
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def sweep_table(runs: list[Run], metrics=HEADLINE) -> pd.DataFrame:
    """One row a run: the varying config keys, then the chosen metrics."""
    keys = varying_keys(runs)
    rows = []
    for run in runs:
        config = flatten(run.config)
        row = {"run": str(run.path)} | {k: config.get(k) for k in keys}
        rows.append(row | {m: run.metrics.get(m, math.nan) for m in metrics})
    return pd.DataFrame(rows)


def capacity(table: pd.DataFrame, rate_key: str = "trace.request_rate",
             min_attainment: float = 0.9) -> float:
    """The highest request rate of a load sweep at which at least `min_attainment` of the
    requests met their SLOs, and so did every lower rate (NaN if even the lowest failed).
    Needs the sweep to have set SLOs (`slo.*`), so `slo_attainment` is in the table."""
    if rate_key not in table or "slo_attainment" not in table:
        raise ValueError(f"capacity needs the columns {rate_key!r} and 'slo_attainment': run the "
                         "load sweep with SLOs (experiment=load_sweep sets them)")
    best = math.nan
    for rate, attainment in sorted(zip(table[rate_key], table["slo_attainment"])):
        if not attainment >= min_attainment:    # NaN fails too
            break
        best = float(rate)
    return best
