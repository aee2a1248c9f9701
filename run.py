"""Replay a request trace on the simulator or the GPU engine (Hydra entry point; the same as
`twinserve run`).

    python run.py                                        # sim, sharegpt, qwen3-0.6b on h100
    python run.py trace=azure_conv trace.num_requests=2000 scheduler=prefill_first
    python run.py mode=gpu trace=sharegpt_tokens         # the real engine, on a GPU
    python run.py mode=gpu engine=cpu                    # the engine on the CPU, tiny model
    python run.py experiment=block_size_sweep            # a ready sweep (see conf/experiment)
    python run.py experiment=calibrate hardware=h200     # profile the engine, fit the cost model
    python run.py --cfg job                              # print the composed config

Each run writes requests.parquet, steps.parquet, summary.json and run.log to its Hydra
output dir (outputs/<date>/<time>/, or multirun/<date>/<time>/<job>/);
`python -m analysis DIR` reads them.
"""
import sys

from twinserve.cli import run_experiment

if __name__ == "__main__":
    sys.exit(run_experiment())
