"""Replay a request trace on the simulator or the GPU engine (Hydra entry point).

    python run.py                                        # sim, sharegpt, qwen3-0.6b on h100
    python run.py trace=azure_conv trace.num_requests=2000 scheduler=prefill_first
    python run.py mode=gpu trace=sharegpt_tokens         # the real engine, on a GPU
    python run.py -m cache.block_size=16,32,64,128 scheduler.max_num_seqs=64,128,256
    python run.py experiment=block_size_sweep            # a ready sweep (see conf/experiment)
    python run.py experiment=calibrate hardware=h200     # profile the engine, fit the cost model
    python run.py --cfg job                              # print the composed config

Each run writes requests.parquet, steps.parquet and summary.json to its Hydra output dir
(outputs/<date>/<time>/, or multirun/<date>/<time>/<job>/); `python -m analysis DIR` reads them.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from experiments.calibrate import calibrate
from experiments.config import register_configs
from experiments.replay import run

register_configs()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    if cfg.task == "calibrate":
        calibrate(cfg, hc.runtime.output_dir, overrides=list(hc.overrides.task))
        return
    run(cfg, hc.runtime.output_dir, name=hc.job.override_dirname or None,
        group=hc.sweep.dir if sweep else None)


if __name__ == "__main__":
    main()
