"""The engine admits a turn's arrivals (add_request) after polling the clock the step is
formed at and before forming it, so their host time lies inside that step's window start_s
-> launch_s. The simulator charges it there (HostCosts.admit_s, admit_token_s), from the
calibration's serving-loop measurement (cost_model.host_window=serving) or a hardware file."""
import dataclasses
import json
import pathlib

import pytest
import yaml

from policy import CacheConfig, SchedulerConfig
from simulator import CudaGraphs, HardwareSpec, ModelSpec, Simulator
from simulator.cost_model import CostModel, CostModelConfig, build_cost_model
from simulator.hardware import HostCosts

ROOT = pathlib.Path(__file__).resolve().parents[1]
CACHE = CacheConfig(block_size=16, enable_prefix_caching=False)
BASE = HostCosts(launch_s=2e-4, launch_seq_s=3e-6, receive_s=2e-5, launch_prompt_s=3e-4)
ADMIT = dataclasses.replace(BASE, admit_s=1.5e-4, admit_token_s=1e-7)


class Flat(CostModel):
    """1 ms a step plus 1 us a token: the device outlasts the host's window."""

    def __init__(self, host: HostCosts):
        self.host = host

    def predict(self, f: dict) -> float:
        return 1e-3 + 1e-6 * f["num_batched_tokens"]


class Request:
    def __init__(self, request_id, arrival_s, prompt_len, output_len):
        self.request_id, self.arrival_s, self.output_len = request_id, arrival_s, output_len
        self.prompt_token_ids = tuple(range(1, prompt_len + 1))


def simulate(host: HostCosts, requests, max_num_seqs: int = 8):
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=2048, max_model_len=4096)
    return Simulator(sched, CACHE, Flat(host), num_blocks=500).run(requests)


def window(step: dict) -> float:
    return step["launch_s"] - step["start_s"]


def test_a_request_s_admission_is_charged_in_the_window_of_the_step_formed_after_it():
    # a decodes; b arrives mid-stretch, c and d arrive together later: each turn that admits
    requests = [Request("a", 0.0, 64, 60), Request("b", 0.0105, 300, 4),
                Request("c", 0.0302, 100, 4), Request("d", 0.0303, 700, 4)]
    base, slow = simulate(BASE, requests), simulate(ADMIT, requests)
    assert len(base.steps) == len(slow.steps)
    prompt_steps = [(a, b) for a, b in zip(base.steps, slow.steps) if b["num_prefill_tokens"]]
    assert [b["num_prefill_tokens"] for _, b in prompt_steps] == [64, 300, 800]   # c and d share a step
    for (a, b), (n, tokens) in zip(prompt_steps, [(1, 64), (1, 300), (2, 800)]):
        assert window(b) - window(a) == pytest.approx(n * ADMIT.admit_s + tokens * ADMIT.admit_token_s)
    # every other step's window is the same: no admission in its turn
    others = [(a, b) for a, b in zip(base.steps, slow.steps) if not b["num_prefill_tokens"]]
    assert others and all(window(b) == pytest.approx(window(a)) for a, b in others)


def test_an_arrival_that_must_wait_is_charged_in_the_turn_that_admits_it():
    """With one sequence running at most, b waits; it was admitted (add_request) in the turn
    after it arrived, whose step decodes a only: that decode step pays b's admission."""
    requests = [Request("a", 0.0, 64, 30), Request("b", 0.0105, 300, 4)]
    base, slow = simulate(BASE, requests, max_num_seqs=1), simulate(ADMIT, requests, max_num_seqs=1)
    extra = [window(b) - window(a) for a, b in zip(base.steps, slow.steps)]
    paid = [i for i, e in enumerate(extra) if e > 1e-9]
    assert extra[0] == pytest.approx(ADMIT.admit_s + 64 * ADMIT.admit_token_s)     # a's own step
    assert len(paid) == 2
    b_turn = slow.steps[paid[1]]
    assert b_turn["num_prefill_tokens"] == 0 and b_turn["start_s"] >= 0.0105
    assert extra[paid[1]] == pytest.approx(ADMIT.admit_s + 300 * ADMIT.admit_token_s)


def test_admission_shows_in_ttft_only_where_the_device_does_not_hide_it():
    """b arrives while a decodes: its prompt step waits for the decode in flight anyway, so a
    short admission costs its TTFT nothing (a's own admission, on an idle device, shifts
    everything after it); one far longer than the device's head start adds most of itself."""
    requests = [Request("a", 0.0, 64, 60), Request("b", 0.0105, 300, 4)]

    def first_tokens(host):
        seqs = {s.seq_id: s for s in simulate(host, requests).sequences}
        return seqs["a"].first_token_time, seqs["b"].first_token_time
    a0, b0 = first_tokens(BASE)
    for admit_s, hidden in ((1e-5, True), (3e-3, False)):
        a, b = first_tokens(dataclasses.replace(BASE, admit_s=admit_s))
        assert a - a0 == pytest.approx(admit_s)                  # a's, on an idle device: all shows
        if hidden:
            assert b - b0 == pytest.approx(a - a0)               # b's: behind the decode in flight
        else:                                                     # b's TTFT: 2.4 ms without
            assert b - b0 > 2e-3


def test_the_serving_window_reads_the_calibration_s_host_serving():
    calib = {"host": {"launch_s": 1e-4, "launch_seq_s": 2e-6, "launch_token_s": 1e-7, "launch_prompt_s": 2e-4,
                      "receive_s": 2e-5, "receive_seq_s": 4e-7},
             "host_serving": {"launch_s": 3e-4, "launch_seq_s": 6e-6, "launch_token_s": 4e-8,
                              "launch_prompt_s": 3.5e-4, "admit_s": 5e-5, "admit_token_s": 2e-8, "n": 300}}
    profile = HostCosts.from_calibration(calib, "profile")
    assert profile == HostCosts(**calib["host"]) and profile.admit_s == 0
    serving = HostCosts.from_calibration(calib, "serving")
    assert serving.before_launch(4, 100) == pytest.approx(3e-4 + 4 * 6e-6 + 100 * 4e-8 + 3.5e-4)
    assert serving.admission(2, 1000) == pytest.approx(2 * 5e-5 + 1000 * 2e-8)
    assert serving.after_wait(4) == profile.after_wait(4)          # the receive stays the profile's
    with pytest.raises(ValueError, match="needs the calibration's host_serving"):
        HostCosts.from_calibration({"host": calib["host"]}, "serving", source="old.json")
    with pytest.raises(ValueError, match="host window must be one of"):
        HostCosts.from_calibration(calib, "wall")
    with pytest.raises(ValueError, match="cost_model.host_window must be one of"):
        CostModelConfig(kind="fitted", path="x.json", host_window="wall")


def test_the_fitted_model_charges_the_window_the_config_names(tmp_path):
    source = ROOT / "simulator/calibrations/qwen3-0.6b-h200-tp1.json"
    calib = json.loads(source.read_text())
    model = ModelSpec.from_hf_config(yaml.safe_load(open(ROOT / "conf/model/qwen3-0.6b.yaml"))["hf_config"],
                                     "qwen3-0.6b")
    hw = HardwareSpec(**yaml.safe_load(open(ROOT / "conf/hardware/h200.yaml")))
    graphs = CudaGraphs.for_engine(256, 8192, 512)
    for window in ("profile", "serving"):
        cost = build_cost_model(CostModelConfig(kind="fitted", path=str(source), host_window=window), model, hw,
                                graphs=graphs)
        assert cost.host == HostCosts.from_calibration(calib, window)
    # the default: the serving loop's window where the file measured it ...
    assert CostModelConfig(kind="fitted", path=str(source)).host_window == "auto"
    auto = build_cost_model(CostModelConfig(kind="fitted", path=str(source)), model, hw, graphs=graphs)
    assert auto.host == HostCosts.from_calibration(calib, "serving") != HostCosts.from_calibration(calib, "profile")
    del calib["host_serving"]
    (tmp_path / "old.json").write_text(json.dumps(calib))
    with pytest.raises(ValueError, match="old.json: host window 'serving'"):
        build_cost_model(CostModelConfig(kind="fitted", path=str(tmp_path / "old.json"), host_window="serving"),
                         model, hw, graphs=graphs)
    # ... and the profile's where it did not
    auto = build_cost_model(CostModelConfig(kind="fitted", path=str(tmp_path / "old.json")), model, hw, graphs=graphs)
    assert auto.host == HostCosts.from_calibration(calib, "profile")


def test_a_hardware_file_states_the_roofline_s_admission():
    hw = HardwareSpec(**yaml.safe_load(open(ROOT / "conf/hardware/h200.yaml")))
    assert hw.host_costs().admit_s == 0 and hw.host_costs().admit_token_s == 0
    host = dataclasses.replace(hw, admit_overhead_s=1e-4, admit_token_overhead_s=5e-8).host_costs()
    assert host.admission(3, 2000) == pytest.approx(3e-4 + 1e-4)
    with pytest.raises(ValueError, match="admit_overhead_s must be >= 0"):
        dataclasses.replace(hw, admit_overhead_s=-1e-6)
