"""`decode_split_seqs`: the decodes the engine's split-KV plan cuts into more than one share
(the sequences whose partial outputs the merge kernel combines). The rule against a count
from the kernel's work list and the engine's own step packing, the same feature from a batch
and a decode stretch, the fitted model learning and pricing it, and files and profiles made
before it still loading and fitting."""
import json
import pathlib

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.kernels.launch import decode_work_capacity, plan_decode_work
from engine.step_inputs import StepBuffer, StepPacker
from policy import Batch, Sequence
from policy.cuda_graphs import decode_sizes, padded_size
from policy.decode_plan import MIN_TOKENS_PER_SPLIT, DecodePlan
from simulator import Simulator
from simulator.calibrate import fit_calibration, step_errors, with_plan_features
from simulator.profile_grid import shape_batch
from simulator.cost_model import CudaGraphs, FittedCostModel
from tests.test_cost_model_span import H200, META, grid_features
from tests.test_fast_forward import LinearCost, observed, skipped_and_reference, workloads

REPO = pathlib.Path(__file__).resolve().parents[1]
QWEN = REPO / "simulator/calibrations/qwen3-0.6b-h200-tp1"


def kernel_merges(contexts, kv_heads=8, sms=132):
    """Sequences the engine's work list gives more than one item (index[b] = (first, count)):
    the merge kernel's programs that do work."""
    return kernel_work(contexts, kv_heads, sms)[1]


def kernel_work(contexts, kv_heads=8, sms=132):
    """(items of the engine's work list, sequences it gives more than one)."""
    n = len(contexts)
    items = np.zeros((decode_work_capacity(n, DecodePlan(kv_heads, sms)), 4), np.int32)
    index = np.zeros((n, 2), np.int32)
    count = plan_decode_work(np.array(contexts), DecodePlan(kv_heads, sms), items, index)
    return count, int((index[:, 1] > 1).sum())


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(1, 9000), min_size=1, max_size=300),
       st.sampled_from([(8, 132), (4, 132), (2, 108), (1, 16)]), st.booleans())
def test_split_seqs_is_the_kernel_work_list_count(contexts, geometry, decode_only):
    plan = DecodePlan(*geometry, decode_graph_sizes=tuple(decode_sizes(256, 8192)))
    rows = padded_size(len(contexts), plan.decode_graph_sizes) if decode_only else 0
    planned = contexts + [1] * max(0, rows - len(contexts))      # a decode graph's padding rows
    _, _, _, shares = plan.shares(planned)
    assert plan.split_seqs(contexts, decode_only) == int((shares > 1).sum()) == kernel_merges(planned, *geometry)
    assert plan.step_features(contexts, decode_only) == {
        "decode_span_tokens": plan.span_tokens(contexts, decode_only),
        "decode_split_seqs": plan.split_seqs(contexts, decode_only),
        "decode_work_items": int(shares.sum())}
    assert int(shares.sum()) == kernel_work(planned, *geometry)[0]     # the kernel's programs per KV head


def test_padding_rows_count_as_the_engine_plans_them():
    # 3 decodes replayed from the 4-row graph: the padding row's token raises the chunk from
    # 3840 / 8 items = 480 tokens to 481, and a 601-token sequence (up to 1.25 chunks) is
    # no longer split
    plan = DecodePlan(1, 2, (1, 2, 4))
    contexts = [601, 601, 3840 - 1202]
    assert plan.split_seqs(contexts, decode_only=False) == 3 == kernel_merges(contexts, 1, 2)  # mixed
    assert plan.split_seqs(contexts, decode_only=True) == 1 == kernel_merges(contexts + [1], 1, 2)
    assert plan.split_seqs([], True) == 0 == plan.span_tokens([], True)
    short = plan.min_tokens_per_split - 4                                     # below the shortest share
    assert plan.split_seqs([short], True) == 0                                # one share: no merge


def packer(kv_heads, sms, graphs=()):
    max_seqs, max_tokens, block_size, max_blocks = 16, 64, 4, 256
    buffer = StepBuffer(max_tokens, max_seqs, max_blocks, max_tokens + max_seqs,
                        decode_work_capacity(max_seqs, DecodePlan(kv_heads, sms)), torch.device("cpu"))
    p = StepPacker(buffer, block_size, max_blocks, max_seqs, 1000, 4, DecodePlan(kv_heads, sms))
    p.decode_sizes = list(graphs)
    return p


def engine_merges_and_feature(entries, graphs: bool) -> tuple[int, int]:
    """A batch of (context, is a prompt chunk) entries packed by the engine's step packing
    (engine.step_inputs, CPU; decode graphs of 1-16 rows if `graphs`): (rows its decode index
    gives more than one item, Batch.features()'s decode_split_seqs)."""
    kv_heads, sms, sizes = 1, 1, (1, 2, 4, 8, 16) if graphs else ()    # 4 items in flight
    plan = DecodePlan(kv_heads, sms, sizes)        # the engine's rule: its constants
    seqs, new, start, block = [], [], [], 1
    for i, (ctx, chunk) in enumerate(entries):
        q = min(ctx, 3) if chunk and ctx > 1 else 1
        s = Sequence(i, [1 + (i + t) % 97 for t in range(ctx)], 4)
        s.num_prompt_tokens = ctx if q > 1 else max(1, ctx - 1)
        s.block_table = list(range(block, block + -(-ctx // 4)))
        block += len(s.block_table)
        seqs.append(s), new.append(q), start.append(ctx - q)
    batch = Batch(seqs=seqs, num_new_tokens=new, num_computed_tokens=start, sample=[True] * len(seqs),
                  num_batched_tokens=sum(new), num_prefill_tokens=sum(q for q in new if q > 1),
                  num_decode_seqs=sum(q == 1 for q in new), block_size=4, decode_plan=plan)
    p = packer(kv_heads, sms, sizes)
    step = p.pack(batch, None)
    index = p.buffer.views(step.T, step.B, step.W, step.P, step.D, step.S)[1][8]
    return int((index[:, 1] > 1).sum()), batch.features()["decode_split_seqs"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(1, 1000), st.booleans()), min_size=1, max_size=12), st.booleans())
def test_the_engine_merges_the_sequences_the_feature_counts(entries, graphs):
    engine, feature = engine_merges_and_feature(entries, graphs)
    assert engine == feature


def test_the_engine_merges_examples():
    long_short = [(900, False), (1000, False), (40, False)]          # padded to 4 rows with a graph
    assert engine_merges_and_feature(long_short, graphs=False) == (2, 2)
    assert engine_merges_and_feature(long_short, graphs=True) == (2, 2)
    assert engine_merges_and_feature(long_short + [(500, True)], graphs=True) == (2, 2)   # mixed
    short = MIN_TOKENS_PER_SPLIT - 4                                 # below the shortest share
    assert engine_merges_and_feature([(short, False)] * 3, graphs=True) == (0, 0)


def test_batch_features_carry_it_only_with_a_plan():
    shape = [(3000, 1), (500, 1), (700, 700), (40, 1)]      # three decodes and a prompt chunk
    f = shape_batch(shape, 16, 4096, H200).features()
    assert f["decode_split_seqs"] == kernel_merges([3000, 500, 40]) == 2   # the chunk is no decode
    assert "decode_split_seqs" not in shape_batch(shape, 16, 4096).features()
    decodes = [(c, 1) for c in (3000, 500, 40)]
    assert shape_batch(decodes, 16, 4096, H200).features()["decode_split_seqs"] == kernel_merges([3000, 500, 40, 1])


class SplitCost(LinearCost):
    """LinearCost plus a cost per split decode: a stretch step with a wrong count changes
    the times. Tiles of 4 tokens and 8-token shares, so short contexts split."""
    decode_plan = DecodePlan(2, 3, (1, 2, 4, 8), block_n=4, min_tokens_per_split=8)

    def predict(self, f: dict) -> float:
        return super().predict(f) + 4.3e-5 * f["decode_split_seqs"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.booleans())
def test_event_skipping_counts_the_splits_step_by_step_does(workload, async_scheduling):
    skipped, reference = skipped_and_reference(SplitCost(), workload, async_scheduling)
    assert observed(skipped) == observed(reference)


# ---- the fitted model -------------------------------------------------------------------
def split_profile(per_split=5e-6):
    """The grid with a known cost: per_split s for every decode the plan splits (the merge)
    beside the span, the KV read and the prefill work."""
    rows = []
    for f, kind, padded, split in grid_features():
        device = (1.2e-3 + 2e-7 * padded + 1e-8 * f["decode_context_tokens"] + 4e-8 * f["decode_span_tokens"]
                  + per_split * f["decode_split_seqs"] + 1e-12 * f["prefill_attention_pairs"]
                  + 2e-9 * f["prefill_kv_tokens"])
        rows.append({**f, "kind": kind, "rows": padded, "split": split, "device_s": device,
                     "host_launch_s": 2e-4, "host_receive_s": 5e-5})
    return pd.DataFrame(rows)


def test_fit_learns_the_merge_cost_and_the_model_reproduces_the_profile():
    profile = split_profile()
    calib = fit_calibration(profile, META)
    graphs = CudaGraphs.for_engine(256, 8192, 8192)
    model = FittedCostModel(calib, graphs=graphs)
    for kind in ("decode", "mixed"):
        fit = calib["kinds"][kind]
        assert fit["coefficients"]["decode_split_seqs"] == pytest.approx(5e-6, rel=0.05), kind
        assert fit["held_out"]["mape"] < 1e-3
        assert fit["forms"][f"{fit['form']} without decode_split_seqs"] > 1e-3   # it matters
    assert model.decode_plan == H200 and "decode_split_seqs" in model.plan_features
    pred = np.array([model.predict(r) for r in profile.to_dict("records")])
    assert np.abs(pred / profile["device_s"] - 1).max() < 5e-3
    # the simulator records the count on every step for a model that prices it
    requests = [type("R", (), dict(request_id=f"r{i}", arrival_s=0.01 * i,
                                   prompt_token_ids=tuple(range(1, 300 + 400 * i)), output_len=40))()
                for i in range(12)]
    from policy import CacheConfig, SchedulerConfig
    run = Simulator(SchedulerConfig(), CacheConfig(), model, 4096).run(requests)
    assert all("decode_split_seqs" in s for s in run.steps)
    assert any(s["decode_split_seqs"] for s in run.steps)
    # a run recorded before the count existed cannot be checked against it: said so
    old = pd.DataFrame(run.steps).drop(columns=["decode_split_seqs"])
    with pytest.raises(ValueError, match="no decode_split_seqs .* record the run again"):
        step_errors(calib, graphs, old)


def test_files_and_profiles_made_before_it_still_load_and_fit(capsys):
    # a calibration that does not price it: loads, and needs no count in the features
    old_profile = split_profile(per_split=0.0).drop(columns=["decode_split_seqs", "decode_work_items"])
    old = fit_calibration(old_profile, META)
    assert "fitted without" in capsys.readouterr().out
    row = old_profile.iloc[-1].to_dict()
    assert FittedCostModel(old).predict(row) > 0 and FittedCostModel(old).plan_features == ["decode_span_tokens"]
    for path in sorted((REPO / "simulator/calibrations").glob("*.json")):   # the shipped files load
        FittedCostModel.load(path)
    # a profile that kept its rows' shapes gets the count from them
    profile = pd.read_parquet(f"{QWEN}.profile.parquet")
    meta = json.loads(pathlib.Path(f"{QWEN}.json").read_text())
    recomputed = with_plan_features(profile.drop(columns=["decode_split_seqs"]), meta)
    assert (recomputed["decode_split_seqs"] == profile["decode_split_seqs"]).all()
    assert recomputed["decode_work_items"].gt(0).any()      # recorded, or computed from the shapes
    assert profile["decode_split_seqs"].gt(0).any()
    # shapes that do not give the profile's own span are not the profiled ones: refused
    wrong = {**meta, "decode_plan": {**meta["decode_plan"], "split_slack": 1.0}}
    with pytest.raises(ValueError, match="differs from its shapes'"):
        with_plan_features(profile.head(50).drop(columns=["decode_split_seqs"]), wrong)
    # without shapes, the count cannot be known: the fit goes without it, said so
    bare = fit_calibration(profile.drop(columns=["decode_split_seqs", "decode_work_items", "shape"],
                                        errors="ignore"), meta)
    assert "no ['decode_split_seqs', 'decode_work_items']" in capsys.readouterr().out
    assert all("decode_split_seqs" not in str(k["forms"]) for k in bare["kinds"].values())


def test_a_run_recorded_without_the_plan_features_gets_them_by_replay(tmp_path):
    """experiments.plan_features: a run's steps (here a simulated run on the roofline, whose
    steps carry no plan features) replayed with a calibration's plan give the features the
    same run records when its executor plans with it."""
    from unittest import mock

    from hydra import compose, initialize_config_dir

    from experiments.config import register_configs
    from experiments.plan_features import main, plan_features
    from experiments.replay import run
    from simulator.cost_model import RooflineCostModel
    overrides = ["mode=sim", "trace=sharegpt", "trace.num_requests=30", "trace.request_rate=40",
                 "model=qwen3-0.6b", "hardware=h200", "logger=none", "progress=false"]
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "conf")):
        cfg = compose("config", overrides=overrides)
    def record(name):      # a run directory as run_fidelity writes one: no .hydra/, the
        run(cfg, tmp_path / name)   # config only in summary.json
    record("bare")
    assert "decode_split_seqs" not in pd.read_parquet(tmp_path / "bare" / "steps.parquet").columns
    plan = DecodePlan(8, 132, tuple(decode_sizes(256, 8192)))
    with mock.patch.object(RooflineCostModel, "decode_plan", plan):   # the executor plans
        record("planned")
    planned = pd.read_parquet(tmp_path / "planned" / "steps.parquet")
    # each run's summary says which split rule priced it (analysis --compare checks it)
    summaries = {n: json.loads((tmp_path / n / "summary.json").read_text())["run"] for n in ("bare", "planned")}
    assert summaries["planned"]["decode_plan"] == {"num_kv_heads": 8, "num_sms": 132, **plan.kernel_rule()}
    assert summaries["bare"]["decode_plan"] is None
    computed = plan_features(tmp_path / "bare", plan.describe())
    assert len(computed) == len(planned) and planned["decode_split_seqs"].gt(0).any()
    for f in ("decode_span_tokens", "decode_split_seqs"):
        assert (computed[f].to_numpy() == planned[f].to_numpy()).all()
    # a plan other than the one the run recorded its span with is refused
    other = {**plan.describe(), "split_slack": 1.0}
    with pytest.raises(ValueError, match="planned its decodes otherwise"):
        plan_features(tmp_path / "planned", other)
    (tmp_path / "c.json").write_text(json.dumps({"decode_plan": plan.describe()}))
    main([str(tmp_path / "bare"), "--calibration", str(tmp_path / "c.json"), "--out", str(tmp_path / "s.parquet")])
    assert pd.read_parquet(tmp_path / "s.parquet")["decode_split_seqs"].equals(computed["decode_split_seqs"])
    # a folder that holds no run is refused in one line
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="not a run directory"):
        main([str(tmp_path / "empty"), "--calibration", str(tmp_path / "c.json"), "--out", str(tmp_path / "x.parquet")])
