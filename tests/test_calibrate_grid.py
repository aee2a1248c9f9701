"""The profiling grid holds the step shapes serving runs (decode batches whose contexts spread
as serving's do, between the graph sizes too; several prompt chunks in one step), holds some
of them out, and every shape is timed as asynchronous serving runs it: launched while the
step before it runs."""
import numpy as np
import pytest

from simulator import CudaGraphs
from simulator.profile_grid import profile_grid, serving, shape_batch

S, M, L = 256, 8192, 8192
GRAPHS = CudaGraphs.for_engine(S, M, M)


def cv(xs):
    return float(np.std(xs) / np.mean(xs))


def test_serving_contexts_spread_as_serving_batches_do():
    drawn = [c for c, n in serving(20_000, 2048, L)]
    assert abs(np.mean(drawn) / 2048 - 1) < 0.03 and 0.6 < cv(drawn) < 0.8
    assert min(drawn) >= 2 and max(serving(512, 6000, L))[0] == L     # clipped to the model's length
    assert serving(24, 1024, L) == serving(24, 1024, L)                 # fixed


def test_grid_profiles_serving_like_decode_batches_at_and_between_graph_sizes():
    grid = profile_grid(S, M, L, GRAPHS)
    spread = {}
    for p in grid:
        ctx = [c for c, n, *_ in p["shape"]]
        if len(ctx) >= 8 and all(n == 1 for _, n, *_ in p["shape"]) and cv(ctx) > 0.5 and len(p["shape"][0]) == 2:
            spread.setdefault(p["split"], []).append((len(ctx), np.mean(ctx)))
    assert set(spread) == {"train", "held_out"}
    sizes = {b for b, _ in spread["train"]}
    assert {b for b in GRAPHS.decode if b >= 8} <= sizes
    for below, b in zip(GRAPHS.decode, GRAPHS.decode[1:]):     # padded, across each bucket
        if below >= 8 and b - below >= 8:
            inside = sorted(n for n in sizes if below < n < b)
            assert inside[0] - below <= (b - below) // 4 and b - inside[-1] <= (b - below) // 4, (below, b, inside)
    train_means = sorted({round(m, -2) for _, m in spread["train"]})
    held_means = sorted({round(m, -2) for _, m in spread["held_out"]})
    assert min(train_means) < min(held_means) and max(held_means) < max(train_means)
    held = {b for b, _ in spread["held_out"]}
    assert held <= sizes and {b for b in GRAPHS.decode if b >= 8} <= held


def test_grid_profiles_several_prompt_chunks_in_one_step():
    grid = profile_grid(S, M, L, GRAPHS)
    multi = [p for p in grid if sum(n > 1 for _, n, *_ in p["shape"]) >= 2]
    assert {p["split"] for p in multi} == {"train", "held_out"}
    assert {sum(n for _, n, *_ in p["shape"]) for p in multi} <= set(GRAPHS.mixed)
    fresh = [p for p in multi if all(c == n for c, n, *_ in p["shape"])]    # no cached context
    assert len(fresh) >= 5
    for p in fresh[:5]:
        tokens = sum(n for _, n, *_ in p["shape"])
        f = shape_batch(p["shape"], 16, 1 << 16).features()
        one = shape_batch([(tokens, tokens)], 16, 1 << 16).features()
        assert f["num_batched_tokens"] == one["num_batched_tokens"]
        assert f["prefill_attention_pairs"] < 0.6 * one["prefill_attention_pairs"]


def test_grid_tells_eager_prompts_pairs_from_their_tokens():
    """Past the largest mixed graph (eager steps) the grid holds several prompts of the same
    tokens as a single chunk, so a fit can tell query-key pairs from tokens there too, among
    the fitted shapes and the held-out ones."""
    graphs = CudaGraphs.for_engine(S, M, 2048)
    pairs = {}
    for p in profile_grid(S, M, L, graphs):
        f = shape_batch(p["shape"], 16, 1 << 16).features()
        if graphs.rows(f)[0] == "eager" and f["num_decode_seqs"] == 0 and f["prefill_kv_tokens"] == f["num_prefill_tokens"]:
            pairs.setdefault((p["split"], f["num_prefill_tokens"]), set()).add(f["prefill_attention_pairs"])
    for split in ("train", "held_out"):
        tokens = [t for s, t in pairs if s == split]
        assert tokens and all(len(pairs[split, t]) >= 3 for t in tokens), (split, pairs)
    largest = max(t for _, t in pairs)
    assert ("train", largest) in pairs


def test_grid_profiles_chunks_behind_long_prefixes():
    """Serving's chunks sit behind up to max_model_len - chunk tokens of earlier context (a
    conversation's cached history, a long prompt's earlier chunks): the grid reaches 6k of
    the 8k, in the train and the held-out shapes, at small and large chunks."""
    behind = {}
    for p in profile_grid(S, M, L, GRAPHS):
        f = shape_batch(p["shape"], 16, 1 << 16).features()
        if f["num_decode_seqs"] == 0 and f["num_seqs"] == 1:
            behind.setdefault(p["split"], []).append((f["prefill_kv_tokens"] - f["num_prefill_tokens"],
                                                      f["num_prefill_tokens"]))
    for split in ("train", "held_out"):
        long = [(c, n) for c, n in behind[split] if c >= 4096]
        assert max(c for c, _ in long) >= 6144 and min(n for _, n in long) <= 64 and max(n for _, n in long) >= 1024
    assert all(c + n <= L for c, n in behind["train"] + behind["held_out"])


class FakeRunner:
    """Logs launches and waits; the device time of launch i is 1 + i ms."""

    def __init__(self):
        self.log, self.wait_s, self.n = [], 0.0, 0

    def launch(self, batch, params, pending):
        self.n += 1
        self.log.append(("launch", self.n))
        return {"i": self.n, "device_s": None}

    def wait(self, launched):
        self.log.append(("wait", launched["i"]))
        launched["device_s"] = 1e-3 * launched["i"]

    # the timing reads attributes, as of the engine's Launched
    class Launched(dict):
        __getattr__ = dict.__getitem__


@pytest.mark.parametrize("repeats", [1, 3])
def test_each_timed_step_is_launched_while_the_previous_runs(repeats, monkeypatch):
    from experiments.calibrate import time_shape
    runner = FakeRunner()
    launch = runner.launch
    monkeypatch.setattr(runner, "launch", lambda *a: FakeRunner.Launched(launch(*a)))
    device, idle_s, launch_s, receive_s = time_shape(runner, None, [], repeats, cuda=True)
    # warm-up (1) waited alone; 2 from an idle device; then 3.. each launched before the
    # previous one is waited on
    assert runner.log[:3] == [("launch", 1), ("wait", 1), ("launch", 2)]
    for i in range(3, repeats + 3):
        assert runner.log.index(("launch", i)) < runner.log.index(("wait", i - 1))
    assert runner.log[-1] == ("wait", repeats + 2)
    assert idle_s == pytest.approx(2e-3)
    assert device == pytest.approx([1e-3 * i for i in range(3, repeats + 3)])
    assert len(launch_s) == repeats and len(receive_s) == repeats + 1


def test_a_chunks_cached_prefix_is_computed_before_it_is_timed():
    from experiments.calibrate import write_prefixes
    batch = shape_batch([(40, 8), (100, 1), (16, 16)], 16, 1 << 12)
    launched = []

    class Runner:
        def launch(self, b, params, pending):
            launched.append(b)
            return b

        def wait(self, b):
            pass
    assert write_prefixes(Runner(), batch, 16, None) == 32
    assert [(b.num_computed_tokens, b.num_new_tokens, b.sample) for b in launched] == \
        [([0], [16], [False]), ([16], [16], [False])]
    assert all(b.seqs == [batch.seqs[0]] and b.num_prefill_tokens == 16 for b in launched)
    assert batch.num_computed_tokens == [32, 99, 0]           # the timed shape is unchanged


def test_grid_profiles_chunks_beside_a_few_decodes():
    """A prompt step below capacity carries a chunk beside a few decodes of serving's contexts
    (their attention runs few work items): every mixed size that holds one has such shapes
    with 1, 3 and 8 decodes, some held out."""
    few = {}
    for p in profile_grid(S, M, L, GRAPHS):
        chunks = [n for _, n, *_ in p["shape"] if n > 1]
        decodes = [c for c, n, *_ in p["shape"] if n == 1]
        if len(chunks) == 1 and 1 <= len(decodes) <= 8 and len(p["shape"][-1]) == 2:
            few.setdefault(sum(chunks) + len(decodes), set()).add((len(decodes), p["split"]))
    for t in GRAPHS.mixed:
        if t >= 16:
            assert {1, 3, 8} <= {d for d, _ in few[t]}, t
    assert {s for shapes in few.values() for _, s in shapes} == {"train", "held_out"}


def test_grid_profiles_bursts_of_many_chunks_behind_cached_context():
    """A burst of conversation turns packs 4-6 prompt chunks, each behind its cached history,
    into one step: the grid holds such steps (train and held out), beside serving's decodes,
    within the token budget and the model's length."""
    found = {}
    for p in profile_grid(S, M, L, GRAPHS):
        chunks = [(c, n) for c, n, *_ in p["shape"] if n > 1]
        if len(chunks) >= 4 and all(c - n >= 1024 for c, n in chunks):
            found.setdefault(p["split"], set()).add(len(chunks))
            assert sum(n for _, n, *_ in p["shape"]) in GRAPHS.mixed
            assert all(c <= L for c, _, *_ in p["shape"])
            assert any(n == 1 for _, n, *_ in p["shape"])          # decodes beside them
    assert set(found) == {"train", "held_out"}
    assert found["train"] | found["held_out"] == {4, 6}
