"""Run loggers: `WandbLogger` (offline by default: no network, no API key) and `NullLogger`
(same methods, does nothing), picked by `make_logger` from `logger.kind`.

The result files stay authoritative; wandb is a view of them.
"""
import os
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.config import LoggerConfig

if TYPE_CHECKING:   # pandas and matplotlib load only when a logger draws something
    import pandas as pd

MAX_TABLE_ROWS = 2000   # per-step series are thinned to this many points


class NullLogger:
    def log_summary(self, metrics: dict) -> None:
        pass

    def log_steps(self, steps: "pd.DataFrame") -> None:
        pass

    def log_cdfs(self, requests: "pd.DataFrame") -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """One wandb run per replay, written under `run_dir/wandb`."""

    def __init__(self, cfg: LoggerConfig, run_dir, config: dict, name: str,
                 group: str | None, job_type: str):
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb     # slow to import; only when asked for
        self.wandb = wandb
        self.run_dir = Path(run_dir)
        self.run = wandb.init(mode=cfg.mode, project=cfg.project, dir=str(self.run_dir),
                              config=config, name=name, group=cfg.group or group,
                              job_type=job_type, tags=list(cfg.tags), reinit="create_new")

    def log_summary(self, metrics: dict) -> None:
        self.run.summary.update(metrics)

    def log_steps(self, steps: "pd.DataFrame") -> None:
        """Batch size, KV usage and step time against time, as wandb line plots. One
        wandb.log call per step would take minutes on long runs; a thinned table is cheap."""
        import pandas as pd
        if steps.empty:
            return
        stride = max(1, len(steps) // MAX_TABLE_ROWS)
        rows = steps.iloc[::stride]
        table = self.wandb.Table(dataframe=pd.DataFrame({
            "time_s": rows["start_s"], "batch_size": rows["num_seqs"],
            "kv_usage": rows["kv_usage"], "step_time_ms": rows["duration_s"] * 1000.0,
            "replica": rows["replica"]}))
        self.run.log({f"steps/{column}": self.wandb.plot.line(table, "time_s", column,
                                                               title=f"{column} over time")
                      for column in ("batch_size", "kv_usage", "step_time_ms")})

    def log_cdfs(self, requests: "pd.DataFrame") -> None:
        from analysis import plots   # matplotlib: only when a figure is drawn
        png = plots.save(plots.latency_cdfs({"this run": requests}), self.run_dir / "cdf.png")
        self.run.log({"latency_cdfs": self.wandb.Image(str(png))})

    def finish(self) -> None:
        self.run.finish()


def make_logger(cfg: LoggerConfig, run_dir, config: dict, name: str, group: str | None,
                job_type: str):
    if cfg.kind == "wandb":
        return WandbLogger(cfg, run_dir, config, name, group, job_type)
    return NullLogger()
