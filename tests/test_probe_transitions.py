"""benchmarks/probe_transitions.py: each step of a cycle is launched while the one before runs,
and the device time kept is the measured position's, from every cycle but the warm-up."""
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
spec = importlib.util.spec_from_file_location("probe_transitions", REPO / "benchmarks/probe_transitions.py")
probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(probe)


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
