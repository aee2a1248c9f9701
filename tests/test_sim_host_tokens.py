"""The host time of a step's launch grows with its prompt tokens (a chunk is packed token by
token): the calibration fits it from the profile, the hardware fit too, and the simulator
charges it before each launch, where it shows when it exceeds the device time of the step
in flight."""
import dataclasses
import pathlib

import numpy as np
import pandas as pd
import pytest
import yaml

from policy import CacheConfig, SchedulerConfig
from simulator import CudaGraphs, ModelSpec, RooflineCostModel, Simulator
from simulator.calibrate import fit_host
from simulator.hardware import HostCosts
from tests.test_simulator import H100   # datasheet peaks and leads

ROOT = pathlib.Path(__file__).resolve().parents[1]
QWEN = ModelSpec.from_hf_config(yaml.safe_load(open(ROOT / "conf/model/qwen3-0.6b.yaml"))["hf_config"], "qwen3-0.6b")
SCHED = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=2048, max_model_len=4096)
CACHE = CacheConfig(block_size=16, enable_prefix_caching=False)


class Request:
    def __init__(self, request_id, arrival_s, prompt_len, output_len):
        self.request_id, self.arrival_s, self.output_len = request_id, arrival_s, output_len
        self.prompt_token_ids = tuple(range(1, prompt_len + 1))


def test_fit_host_recovers_a_per_prompt_token_launch_cost():
    rng = np.random.default_rng(0)
    seqs = rng.integers(1, 256, 400)
    tokens = np.where(rng.random(400) < 0.5, 0, rng.integers(1, 8192, 400))
    profile = pd.DataFrame({"num_seqs": seqs, "num_prefill_tokens": tokens,
                            "host_launch_s": 9e-4 + 3e-6 * seqs + 2e-7 * tokens,
                            "host_receive_s": 2e-5 + 5e-7 * seqs})
    host = fit_host(profile)
    assert host["launch_s"] == pytest.approx(9e-4) and host["launch_seq_s"] == pytest.approx(3e-6)
    assert host["launch_token_s"] == pytest.approx(2e-7)
    assert host["receive_s"] == pytest.approx(2e-5) and "receive_token_s" not in host
    costs = HostCosts(**host)
    assert costs.before_launch(10, 4000) == pytest.approx(9e-4 + 3e-5 + 8e-4)


def test_fit_host_recovers_a_per_prompt_step_launch_cost():
    """A step that carries a prompt chunk pays once more (the prefill path's own work),
    whatever its tokens: fitted apart from the per-token cost, charged to prompt steps only."""
    rng = np.random.default_rng(1)
    seqs = rng.integers(1, 256, 400)
    tokens = np.where(rng.random(400) < 0.5, 0, rng.integers(1, 8192, 400))
    profile = pd.DataFrame({"num_seqs": seqs, "num_prefill_tokens": tokens,
                            "host_launch_s": 3e-4 + 3e-6 * seqs + 1e-7 * tokens + 4e-4 * (tokens > 0),
                            "host_receive_s": 2e-5 + 5e-7 * seqs})
    host = fit_host(profile)
    assert host["launch_prompt_s"] == pytest.approx(4e-4) and host["launch_s"] == pytest.approx(3e-4)
    assert host["launch_token_s"] == pytest.approx(1e-7)
    costs = HostCosts(**host)
    assert costs.before_launch(10, 0) == pytest.approx(3e-4 + 3e-5)
    assert costs.before_launch(10, 1) - costs.before_launch(10, 0) == pytest.approx(4e-4 + 1e-7)
    hw = dataclasses.replace(H100, prefill_step_overhead_s=4e-4)
    assert hw.host_costs().launch_prompt_s == 4e-4
    with pytest.raises(ValueError, match="prefill_step_overhead_s"):
        dataclasses.replace(H100, prefill_step_overhead_s=-1e-6)


def run(token_s: float):
    hw = dataclasses.replace(H100, prefill_token_overhead_s=token_s)
    cost = RooflineCostModel(QWEN, hw, graphs=CudaGraphs.for_engine(16, 2048, 2048))
    assert cost.host.launch_token_s == token_s
    # one long request decoding, then a 2,000-token prompt arriving while it runs
    requests = [Request("a", 0.0, 64, 200), Request("b", 0.05, 2000, 4)]
    return Simulator(SCHED, CACHE, cost, num_blocks=1000).run(requests), hw


def test_the_simulator_charges_the_prompt_tokens_before_the_launch():
    base, hw = run(0.0)
    slow, _ = run(1e-6)                       # 2 ms of packing for the 2,000-token chunk
    mixed = [(a, b) for a, b in zip(base.steps, slow.steps) if a["num_prefill_tokens"] == 2000]
    assert len(mixed) == 1
    a, b = mixed[0]
    assert (a["launch_s"] - a["start_s"]) == pytest.approx(hw.step_overhead_s + hw.seq_overhead_s * a["num_seqs"])
    assert (b["launch_s"] - b["start_s"]) - (a["launch_s"] - a["start_s"]) == pytest.approx(2000e-6)
    # the packing outlasts the decode step in flight: the device waits, and b's first token comes later
    first = {s.seq_id: s.first_token_time for s in base.sequences}
    later = {s.seq_id: s.first_token_time for s in slow.sequences}
    assert later["b"] > first["b"] + 1e-3
    # decode-only steps pay no token cost (the first step, a's prompt alone, pays 64 tokens' worth)
    decodes = [(a, b) for a, b in zip(base.steps, slow.steps)
               if a["num_prefill_tokens"] == 0 and a["start_s"] < 0.04]
    assert decodes and all((b["launch_s"] - b["start_s"]) == pytest.approx(a["launch_s"] - a["start_s"])
                           for a, b in decodes)
