"""The `twinserve` command: one entry point for the project's tools.

    twinserve run [overrides...]        replay a trace on the simulator or the engine (Hydra;
                                        the same as python run.py)
    twinserve analyze DIR... [--compare REAL SIM]   tables and figures (python -m analysis)
    twinserve serve --model DIR ...     OpenAI-compatible server (python -m server, else
                                        python -m engine.serve)
    twinserve bench ...                 load generator against a server (python -m bench)
    twinserve calibrate ...             fit a cost model on the engine (experiments.calibrate)
    twinserve checkpoint MODEL DIR      random-weight checkpoint (python -m engine.checkpoint)

Errors the project reports (a bad config value, a bad trace row, a missing GPU) print as
one line, `error: ...`, and exit 1; TWINSERVE_TRACEBACK=1 (or HYDRA_FULL_ERROR=1) shows the
full trace instead. Modules are imported only for the command that needs them.
"""
import importlib.util
import logging
import os
import runpy
import shutil
import sys
from pathlib import Path

import hydra
from hydra.experimental.callback import Callback

log = logging.getLogger("twinserve")

# Exceptions through which the project reports bad input or a missing piece, with a
# message meant for the user; anything else is a bug and keeps its traceback.
PROJECT_ERRORS = (ValueError, RuntimeError, FileNotFoundError, ImportError)
TOOLS = {   # command -> modules run as __main__ (the first one installed), extra it needs
    "analyze": (("analysis",), None),
    "serve": (("server", "engine.serve"), "serve"),
    "bench": (("bench",), "serve"),
    "calibrate": (("experiments.calibrate",), "engine"),
    "checkpoint": (("engine.checkpoint",), "engine"),
}
USAGE = __doc__.split("\n\n")[1]


def conf_dir() -> Path:
    """The Hydra configs: shipped inside this package by `pip install .`, else the
    repository's conf/ (a source checkout or an editable install)."""
    packaged = Path(__file__).resolve().parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf"


def full_traceback() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in
               ("TWINSERVE_TRACEBACK", "HYDRA_FULL_ERROR"))


def report_error(error: Exception) -> None:
    print(f"error: {error}", file=sys.stderr)


# ---- twinserve run -----------------------------------------------------------------
def _quiet_console() -> None:
    """In a sweep, jobs run in parallel processes: their console shows warnings and errors
    only (each job prints one line), while run.log keeps everything."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:
            handler.setLevel(logging.WARNING)


def _remove_failed_run_dir(run_dir: Path) -> None:
    """A single run that failed before writing results leaves no folder behind (only
    Hydra's .hydra/ and the log would be in it); empty parents (outputs/<date>) go too."""
    if (run_dir / "summary.json").exists():
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    parent, stop = run_dir.parent, Path.cwd()
    while parent != stop and parent.is_dir() and not any(parent.iterdir()):
        parent.rmdir()
        parent = parent.parent


def job_line(num: int, name: str, metrics: dict, wall_s: float | None = None) -> str:
    """One line for one sweep job."""
    def ms(key):
        value = metrics.get(key)
        return "n/a" if value is None or value != value else f"{value:.0f} ms"
    line = (f"job {num} [{name}]: {metrics['completed']} requests, "
            f"{metrics['request_throughput']:.2f} req/s, p99 TTFT {ms('p99_ttft_ms')}, "
            f"p99 TPOT {ms('p99_tpot_ms')}, {metrics['num_preemptions']} preemptions")
    if "slo_attainment" in metrics:
        line += f", {100 * metrics['slo_attainment']:.0f}% within SLO"
    return line


def experiment(cfg) -> dict | None:
    """The Hydra task: one replay (experiments.replay.run) in Hydra's output folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import open_dict

    from experiments.replay import run

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    name = hc.job.override_dirname or None
    if cfg.get("task") == "calibrate":     # experiment=calibrate: profile the engine, fit
        from experiments.calibrate import calibrate
        calibrate(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task))
        return None
    if sweep:
        _quiet_console()
        with open_dict(cfg):
            cfg.progress = False     # parallel progress bars garble each other
    try:
        metrics = run(cfg, run_dir, name=name, group=hc.sweep.dir if sweep else None)
    except PROJECT_ERRORS as e:
        if full_traceback():
            raise
        if sweep:    # one line, also in the job's run.log; the sweep's table lists it
            log.error(f"job {hc.job.num} [{name}]: failed: {e}")
            return None
        _remove_failed_run_dir(run_dir)
        report_error(e)
        raise SystemExit(1) from None
    if sweep:
        print(job_line(hc.job.num, name or "defaults", metrics), flush=True)
    return metrics


def _hydra_main():
    from experiments.config import register_configs
    register_configs()
    return hydra.main(version_base="1.3", config_path=str(conf_dir()),
                      config_name="config")(experiment)()


def run_experiment(argv: list[str] | None = None) -> int:
    """`twinserve run` / `python run.py`: Hydra reads the overrides from sys.argv."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    try:
        _hydra_main()
    except PROJECT_ERRORS as e:      # raised while building the config, before the task
        if full_traceback():
            raise
        report_error(e)
        return 1
    return 0


class SweepSummary(Callback):
    """After a sweep (hydra multirun): one table row per job, in job order, with its
    overrides and headline metrics, or why it failed; exits 1 if any job failed."""

    COLUMNS = {"request_throughput": "req/s", "p99_ttft_ms": "p99 TTFT ms",
               "p99_tpot_ms": "p99 TPOT ms", "num_preemptions": "preempted",
               "prefix_cache_hit_rate": "prefix hits", "slo_attainment": "in SLO"}

    def on_multirun_end(self, config, **kwargs) -> None:
        import json

        import pandas as pd
        import yaml

        from analysis.metrics import format_value
        sweep_dir = Path(config.hydra.sweep.dir)
        rows, failed = [], 0
        jobs = [p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        for job in sorted(jobs, key=lambda p: int(p.name)):
            overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()) or []
            row = {"job": int(job.name)} | dict(o.split("=", 1) for o in overrides if "=" in o)
            summary = job / "summary.json"
            if summary.is_file():
                metrics = json.loads(summary.read_text())["metrics"]
                row |= {"status": "ok"} | {label: metrics.get(key) for key, label
                                           in self.COLUMNS.items() if key in metrics}
            else:
                failed += 1
                row["status"] = "failed: see run.log"
            rows.append(row)
        if not rows:
            return
        table = pd.DataFrame(rows)
        same = [c for c in table.columns[1:] if c not in self.COLUMNS.values() and c != "status"
                and table[c].nunique(dropna=False) == 1]
        table = table.drop(columns=same)
        for column in self.COLUMNS.values():
            if column in table:
                table[column] = [format_value(v) if v == v and v is not None else ""
                                 for v in table[column]]
        with pd.option_context("display.width", 200, "display.max_columns", 30):
            print(f"\nsweep: {len(rows)} jobs in {sweep_dir}\n{table.to_string(index=False)}")
        print(f"figures and the full table: twinserve analyze {sweep_dir}")
        if failed:
            print(f"error: {failed} of {len(rows)} jobs failed", file=sys.stderr)
            raise SystemExit(1)


# ---- the other tools ---------------------------------------------------------------
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:        # its parent package is missing
        return False


def run_tool(command: str, argv: list[str]) -> int:
    """Run a tool's module as `python -m module argv...` would."""
    modules, extra = TOOLS[command]
    module = next((m for m in modules if _installed(m)), None)
    if module is None:
        print(f"error: twinserve {command} needs the module {modules[0]!r}, which this "
              "install does not have", file=sys.stderr)
        return 1
    sys.argv = [f"twinserve {command}", *argv]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except ModuleNotFoundError as e:      # a dependency of the tool
        if full_traceback():
            raise
        hint = f": pip install 'twinserve[{extra}]'" if extra else ""
        report_error(f"twinserve {command} needs {e.name!r}{hint}")
        return 1
    except PROJECT_ERRORS as e:
        if full_traceback():
            raise
        report_error(e)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(f"usage: twinserve COMMAND [ARGS...]\n\n{USAGE}\n\n"
              "`twinserve COMMAND --help` explains each.")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return run_experiment(rest)
    if command in TOOLS:
        return run_tool(command, rest)
    print(f"error: unknown command {command!r}; one of run, {', '.join(TOOLS)}",
          file=sys.stderr)
    return 2
