"""Decodes sharing KV blocks (prefix-cache hits): the step feature
`decode_distinct_context_tokens`, the same from the scheduler, a decode stretch and the
calibration grid; the fitted and roofline cost models pricing it; profiles and runs made
before it was recorded still working."""
from dataclasses import replace
from functools import cache
from itertools import chain

import numpy as np
import pandas as pd
import pytest

from policy import Batch, CacheConfig, Scheduler, SchedulerConfig, Sequence
from policy.batch import repeated_kv_tokens
from simulator import calibrate
from simulator.calibrate import fit_calibration, fit_hardware, step_errors
from simulator.profile_grid import profile_grid, shape_batch
from simulator.cost_model import CudaGraphs, FittedCostModel, RooflineCostModel
from tests.test_simulator import GRAPHS, H100, QWEN, roofline_profile

BS = 4
META = {"model": "qwen3-0.6b", "device": "stand-in", "command": "pytest"}


def decode_batch(tables, contexts, block_size=BS):
    """Decodes over the given block tables, `contexts[i]` tokens after the step."""
    batch = Batch(block_size=block_size)
    for i, (table, ctx) in enumerate(zip(tables, contexts)):
        seq = Sequence(i, [1] * ctx, 1)
        seq.num_prompt_tokens = ctx - 1
        seq.block_table = list(table)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(1)
        batch.num_computed_tokens.append(ctx - 1)
        batch.sample.append(True)
        batch.num_batched_tokens += 1
        batch.num_decode_seqs += 1
    return batch


def brute_distinct(tables, contexts, block_size=BS):
    """Tokens of the distinct blocks read: each block once, with the tokens its readers read."""
    tokens = {}
    for table, ctx in zip(tables, contexts):
        for j, block in enumerate(table):
            tokens[block] = max(tokens.get(block, 0), min(block_size, ctx - j * block_size))
    return sum(tokens.values())


def test_distinct_context_is_the_total_without_sharing():
    tables = [[1, 2, 3], [4, 5], [6]]
    f = decode_batch(tables, [10, 6, 3]).features()
    assert f["decode_distinct_context_tokens"] == f["decode_context_tokens"] == 19


@pytest.mark.parametrize("tables,contexts", [
    ([[1, 2, 3], [1, 2, 4], [1, 5]], [11, 10, 6]),                         # one prefix, three readers
    ([[1, 2, 3, 7], [1, 2, 3, 8], [1, 2, 4, 9], [1, 2, 4, 10], [1, 11]],    # a trie: branches share more
     [15, 14, 16, 13, 5]),
    ([[1, 2, 3], [4, 5, 6], [1, 2, 7], [4, 8]], [12, 9, 10, 7]),            # two groups
    ([[1, 2], [1, 2, 3]], [8, 9]),                                          # one table ends on the prefix
])
def test_distinct_context_counts_each_shared_block_once(tables, contexts):
    f = decode_batch(tables, contexts).features()
    assert f["decode_context_tokens"] == sum(contexts)
    assert f["decode_distinct_context_tokens"] == brute_distinct(tables, contexts) < sum(contexts)
    # the order of the sequences in the step does not matter
    assert decode_batch(tables[::-1], contexts[::-1]).features() == f


def test_a_prefill_chunk_reading_shared_blocks_is_not_a_repeat():
    """Only decodes count: a chunk after a prefix hit reads the blocks in its own kernel."""
    batch = decode_batch([[1, 2, 3]], [11])
    chunk = Sequence(9, [1] * 12, 1)
    chunk.block_table = [1, 2, 5]
    batch.seqs.append(chunk)
    batch.num_new_tokens.append(4)
    batch.num_computed_tokens.append(8)
    batch.sample.append(True)
    batch.num_batched_tokens += 4
    batch.num_prefill_tokens += 4
    f = batch.features()
    assert f["decode_context_tokens"] == f["decode_distinct_context_tokens"] == 11


def test_shared_blocks_need_the_block_size():
    with pytest.raises(ValueError, match="block_size"):
        decode_batch([[1, 2], [1, 3]], [6, 6], block_size=0).features()
    assert repeated_kv_tokens([[1, 2], [3]], 0) == 0      # nothing shared: no size needed


def test_the_scheduler_and_a_decode_stretch_see_prefix_hits():
    """Two requests with a common 12-token prompt prefix (3 full blocks of 4): once both
    decode, the second's 3 cached blocks are the first's; a stretch (event skipping)
    reports what step-by-step scheduling does."""
    from policy.fast_forward import plan_decode_stretch

    def scheduler():
        sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                          CacheConfig(block_size=BS, enable_prefix_caching=True), num_blocks=64)
        prefix = list(range(1, 13))
        sched.add(Sequence("a", prefix + [20, 21], 12, ignore_eos=True))
        batch = sched.schedule(0.0)
        sched.update(batch, [5], 0.0)
        sched.add(Sequence("b", prefix + [30], 12, ignore_eos=True))
        batch = sched.schedule(0.0)
        sched.update(batch, [5] * len(batch), 0.0)
        return sched

    sched = scheduler()
    a, b = sched.running
    assert a.block_table[:3] == b.block_table[:3] and b.num_cached_tokens == 12
    records = []
    for t in range(1, 6):
        batch = sched.schedule(float(t))
        records.append(batch.record(float(t), 0.0))
        sched.update(batch, [5] * len(batch), float(t))
    for r in records:
        assert r["num_decode_seqs"] == 2
        assert r["decode_distinct_context_tokens"] == r["decode_context_tokens"] - 12
    fresh = scheduler()
    stretch = plan_decode_stretch(fresh, {"a": 5, "b": 5})
    skipped = []
    for t in range(1, 6):
        skipped.append(stretch.schedule(float(t)))
        stretch.update(float(t))
    assert skipped == records


# ---- the calibration grid -------------------------------------------------------------
def test_grid_has_decodes_sharing_real_blocks_in_train_and_held_out():
    full = CudaGraphs.for_engine(64, 2048, 2048)
    seen = set()
    for p in profile_grid(64, 2048, 4096, full):
        groups = {}
        for i, entry in enumerate(p["shape"]):
            if len(entry) == 4:
                groups.setdefault(entry[3], []).append(i)
        if not groups:
            continue
        batch = shape_batch(p["shape"], 16, 20000)
        f = batch.features()
        for members in groups.values():
            # each shares its first min(shared, context - new) tokens' whole blocks, the same ids
            common = {i: min(p["shape"][i][2], p["shape"][i][0] - p["shape"][i][1]) // 16 for i in members}
            prefix = batch.seqs[max(members, key=common.get)].block_table
            assert min(common.values()) >= 1 and len(members) > 1
            assert all(batch.seqs[i].block_table[:k] == prefix[:k] for i, k in common.items())
            tables = [batch.seqs[i].block_table for i in members]
            # the block each decode writes this step is its own
            last = [t[(s.num_tokens - 1) // 16] for t, s in zip(tables, (batch.seqs[i] for i in members))]
            assert len(set(last)) == len(last)
        expected = brute_distinct([s.block_table for s, n in zip(batch.seqs, batch.num_new_tokens) if n == 1],
                                  [s.num_tokens for s, n in zip(batch.seqs, batch.num_new_tokens) if n == 1], 16)
        assert f["decode_distinct_context_tokens"] == expected < f["decode_context_tokens"]
        seen.add((full.rows(f)[0], p["split"]))
    assert seen == {("decode", "train"), ("decode", "held_out"), ("mixed", "train"), ("mixed", "held_out")}


# ---- the fitted model -----------------------------------------------------------------
@cache
def grid_features():
    """(features, kind, rows, split) of the H200 engine's grid (256 sequences, 8192 tokens)."""
    graphs = CudaGraphs.for_engine(256, 8192, 8192)
    out = []
    for p in profile_grid(256, 8192, 8192, graphs):
        f = shape_batch(p["shape"], 16, 66803).features()
        out.append((f, *graphs.rows(f), p["split"]))
    return out


def planted_profile(first_read=3e-8, reread=0.6e-8, slope=lambda rows: 0.0):
    """The grid's shapes with a known cost: a decode's first read of a KV token costs
    `first_read` s, a read of a shared block's token after the first `reread` s, every
    token of KV `slope(rows)` s more."""
    rows = []
    for f, kind, padded, split in grid_features():
        distinct, total = f["decode_distinct_context_tokens"], f["decode_context_tokens"]
        device = (1.2e-3 + 2e-7 * padded + first_read * distinct + reread * (total - distinct)
                  + slope(padded) * total
                  + 1e-12 * f["prefill_attention_pairs"] + 2e-9 * f["prefill_kv_tokens"])
        rows.append({**f, "kind": kind, "rows": padded, "split": split, "device_s": device,
                     "host_launch_s": 2e-4, "host_receive_s": 5e-5})
    return pd.DataFrame(rows)


def test_fit_recovers_a_planted_reread_cost():
    calib = fit_calibration(planted_profile(), META)
    for kind in ("decode", "mixed"):
        fit = calib["kinds"][kind]
        coef = fit["coefficients"]
        assert "without decode_distinct_context_tokens" not in fit["variant"]
        assert coef["decode_context_tokens"] == pytest.approx(0.6e-8, rel=0.05), kind
        assert coef["decode_distinct_context_tokens"] == pytest.approx(3e-8 - 0.6e-8, rel=0.05), kind
        assert fit["held_out"]["mape"] < 0.01
    # without the feature the same profile is priced worse on the shapes not fitted on
    fit = calib["kinds"]["decode"]
    assert fit["forms"][fit["variant"]] < fit["forms"][f"{fit['form']} without decode_distinct_context_tokens"]


def test_fit_finds_a_cost_per_token_that_depends_on_the_batch():
    """A decode step whose KV costs more per token at mid batch sizes (as measured on the
    H200): the " sloped" variant is kept and recovers it; a flat cost keeps one slope."""
    bump = lambda rows: 1e-8 * max(0.0, 1 - abs(np.log2(rows / 32)) / 3)    # peaks at 32 rows
    calib = fit_calibration(planted_profile(slope=bump), META)
    fit = calib["kinds"]["decode"]
    assert fit["variant"].endswith(" sloped") and "decode_context_tokens" not in fit["coefficients"]
    slope = fit["slopes"]["decode_context_tokens"]
    at = dict(zip(slope["knots"], slope["coefficients"]))
    assert at[256] == pytest.approx(0.6e-8, rel=0.2)                    # past the bump
    inner = [c for k, c in at.items() if 1 < k < 256]
    assert max(inner) > 1.2e-8 and max(inner) > 2 * at[256]             # a mid-batch knot carries it
    assert fit["held_out"]["mape"] < fit["forms"][fit["variant"].removesuffix(" sloped")]
    # it loads and prices steps with the slope
    model = FittedCostModel(calib, graphs=CudaGraphs.for_engine(256, 8192, 8192))
    f = shape_batch([(1024, 1)] * 32, 16, 66803).features()
    assert model.predict(f) == pytest.approx(1.2e-3 + 2e-7 * 32 + (3e-8 + bump(32)) * 32 * 1024, rel=0.03)
    broken = {**calib, "kinds": {"decode": {**fit, "slopes": {"decode_context_tokens": {"knots": [1, 8],
                                                                                         "coefficients": [1e-8]}}}}}
    with pytest.raises(ValueError, match="slope of 'decode_context_tokens' needs as many coefficients as knots"):
        FittedCostModel(broken)
    flat = fit_calibration(planted_profile(), META)["kinds"]["decode"]
    assert not flat["variant"].endswith(" sloped") and "slopes" not in flat


def test_profiles_and_runs_without_the_column_still_work(capsys):
    profile = planted_profile(reread=3e-8)            # no reuse: the feature has nothing to learn
    old = profile.drop(columns=["decode_distinct_context_tokens"])
    calib = fit_calibration(old, META)
    assert "no ['decode_distinct_context_tokens'" in capsys.readouterr().out
    assert all("decode_distinct_context_tokens" not in k["coefficients"] for k in calib["kinds"].values())
    # a new profile whose shapes share nothing: fitted without it, said so
    unshared = profile[profile["decode_distinct_context_tokens"] == profile["decode_context_tokens"]]
    calib = fit_calibration(unshared, META)
    assert "fitted without decode_distinct_context_tokens" in capsys.readouterr().out
    assert all("decode_distinct_context_tokens" not in k["coefficients"] for k in calib["kinds"].values())
    # a run's steps recorded before the column: checked as unshared steps, said so
    errors = step_errors(calib, CudaGraphs.for_engine(256, 8192, 8192), old.head(50))
    assert sum(e["n"] for e in errors.values()) == 50
    assert "taken as decode_context_tokens" in capsys.readouterr().out
    # a calibration fitted before the column (the fidelity table's) prices steps with or without it
    model = FittedCostModel.load("benchmarks/fidelity/results/qwen3-0.6b-h200/calibration.json",
                                 graphs=CudaGraphs.for_engine(256, 8192, 8192))
    row = old.iloc[0].to_dict()
    assert model.predict(row) == model.predict({**row, "decode_distinct_context_tokens": 0})


# ---- the roofline ---------------------------------------------------------------------
def test_roofline_prices_rereads_by_the_hardware_and_fits_it():
    shared = shape_batch([(1024, 1, 960, 0)] * 32, 16, 4000).features()
    unshared = shape_batch([(1024, 1)] * 32, 16, 4000).features()
    assert shared["decode_context_tokens"] == unshared["decode_context_tokens"]
    plain = RooflineCostModel(QWEN, H100, graphs=GRAPHS)
    l2 = RooflineCostModel(QWEN, replace(H100, shared_kv_read_cost=0.2), graphs=GRAPHS)
    assert plain.predict(shared) == plain.predict(unshared) == l2.predict(unshared)
    assert l2.predict(shared) < plain.predict(shared)
    with pytest.raises(ValueError, match="shared_kv_read_cost"):
        replace(H100, shared_kv_read_cost=0.0)
    truth_hw = replace(H100, attention_bandwidth_efficiency=0.4, shared_kv_read_cost=0.25)
    profile = roofline_profile(RooflineCostModel(QWEN, truth_hw, graphs=GRAPHS))
    fitted, report = fit_hardware(profile, QWEN, H100, 1, GRAPHS, sweeps=3)
    assert fitted.shared_kv_read_cost == pytest.approx(0.25, rel=0.25)
    assert max(report.values()) < 0.05
    # a profile without shared shapes leaves the spec's value alone
    old = profile.drop(columns=["decode_distinct_context_tokens"])
    assert fit_hardware(old, QWEN, H100, 1, GRAPHS, sweeps=1)[0].shared_kv_read_cost == 1.0


def test_a_duplicate_block_shared_after_a_fork_is_counted():
    """A concurrent prompt can register a duplicate of a block, so two tables may share a
    later block but not the one before it: every repeated reference still counts."""
    assert repeated_kv_tokens([[1, 2, 14, 16], [1, 2, 13, 16]], 4) == 3 * 4
    assert repeated_kv_tokens([[1, 2, 3], [1, 2, 3], [7, 8]], 2) == 3 * 2
