"""benchmarks/probe_transitions.py: each step of a cycle is launched while the one before runs,
and the device time kept is the measured position's, from every cycle but the warm-up."""
import bench_scripts
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
probe = bench_scripts.load("benchmarks/probe_transitions.py")


class FakeRunner:
    """Launches return handles whose device time names the batch; records the in-flight depth."""
    def __init__(self):
        self.in_flight, self.max_in_flight, self.launches = 0, 0, 0

    def launch(self, batch, params, pending):
        self.in_flight += 1
        self.launches += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        return SimpleNamespace(device_s=batch.cost, waited=False)

    def wait(self, launched):
        assert not launched.waited
        launched.waited = True
        self.in_flight -= 1


def test_the_measured_position_of_every_cycle_is_kept_with_one_step_ahead():
    a, b, c = (SimpleNamespace(seqs=[0], cost=x) for x in (1.0, 2.0, 3.0))
    runner = FakeRunner()
    for measured, cost in ((0, 1.0), (1, 2.0), (2, 3.0)):
        runner.__init__()
        times = probe.timed_cycles(runner, [a, b, c], measured, repeats=5)
        assert times == [cost] * 5
        assert runner.launches == 3 * 6 and runner.in_flight == 0 and runner.max_in_flight == 2


def test_recovery_times_the_burst_by_position_and_the_steps_after_each_gap():
    prompt, decode = SimpleNamespace(seqs=[0], cost=5.0), SimpleNamespace(seqs=[0], cost=1.0)
    runner = FakeRunner()
    rows = probe.recovery(runner, prompt, decode, burst=4, gaps=(0, 2))
    burst = [r for r in rows if r["case"] == "burst"]
    assert [r["at"] for r in burst] == [1, 2, 3, 4] and all(r["ms"] == 5e3 for r in burst)
    after = {(r["case"], r["at"]): r["ms"] for r in rows if r["case"] != "burst"}
    assert after[("prompt after burst + decodes", 0)] == after[("prompt after burst + decodes", 2)] == 5e3
    assert after[("decode right after burst", 2)] == 1e3       # the step right after the burst
    assert ("decode right after burst", 0) not in after         # none without decodes
    # warm-up (2) + the burst (4) + per gap a burst, the gap's decodes and one prompt step
    assert runner.launches == 2 + 4 + (4 + 0 + 1) + (4 + 2 + 1)
    assert runner.in_flight == 0 and runner.max_in_flight == 2


def test_contiguous_layout_takes_blocks_in_order_with_the_same_features():
    from simulator.profile_grid import shape_batch
    shape = [(100, 1), (40, 1), (300, 20)]
    scattered = shape_batch(shape, 16, 1000)
    contiguous = shape_batch(shape, 16, 1000, contiguous=True)
    blocks = [b for s in contiguous.seqs for b in s.block_table]
    assert blocks == list(range(1, len(blocks) + 1))
    assert [b for s in scattered.seqs for b in s.block_table] != blocks
    assert contiguous.features() == scattered.features()


def test_share_times_each_layout_with_and_without_the_shared_prefix(monkeypatch):
    """Per layout: the step whose decodes share the prefix's blocks and the same contexts with
    nothing shared; the saving is their difference per re-read token, (D - 1) x shared."""
    class Runner(FakeRunner):
        num_blocks = 4096

        def launch(self, batch, params, pending):   # 1 ms + 1 ns per distinct KV token read
            f = batch.features()
            return SimpleNamespace(device_s=1e-3 + 1e-9 * f["decode_distinct_context_tokens"], waited=False)
    runner = Runner()
    llm = SimpleNamespace(model_runner=runner, config=SimpleNamespace(block_size=16), decode_plan=lambda: None)
    args = SimpleNamespace(max_model_len=4096, shared=512, context=2048, repeats=3)
    rows = probe.shares(llm, args, 8)
    assert [r["layout"] for r in rows] == ["scattered", "contiguous"]
    for r in rows:
        assert r["reread_tokens"] == 7 * 512 and r["shared_ms"] < r["alone_ms"]
        assert r["saving_ns"] == pytest.approx(1.0)     # 1 ns per token the shared step does not read again
