"""Simulator: end to end on small synthetic request lists, the cost models, the routers."""
import json
import pathlib
import random
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import pytest
import yaml

from policy import Batch, CacheConfig, Scheduler, SchedulerConfig, Sequence
from policy.cuda_graphs import decode_sizes, graph_rows, mixed_sizes
from simulator import (CostModelConfig, CudaGraphs, FittedCostModel, HardwareSpec, ModelSpec,
                       ReplayCostModel, RooflineCostModel, Simulator, build_cost_model,
                       kv_pool_blocks)
from simulator import calibrate
from simulator.calibrate import fit_calibration, fit_hardware, step_errors
from simulator.profile_grid import profile_grid, shape_batch
from simulator.cost_model import TIE_MAPE, base_time
from simulator.cluster import Replica, least_outstanding

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_model(name: str) -> ModelSpec:
    cfg = yaml.safe_load(open(ROOT / "conf" / "model" / f"{name}.yaml"))
    return ModelSpec.from_hf_config(cfg["hf_config"], name=cfg["name"])


def load_hardware(name: str) -> HardwareSpec:
    return HardwareSpec(**yaml.safe_load(open(ROOT / "conf" / "hardware" / f"{name}.yaml")))


# An H100 as its datasheet and leads describe it (additive roofline, no fitted fixed costs):
# the tests here check the cost models' mechanics. conf/hardware/h100.yaml itself carries the
# H200's fitted values, transferred (simulator.hardware_fit --transfer-from).
H100_DATASHEET = """# NVIDIA H100: datasheet peaks and leads
name: h100
peak_tflops: 989.0
hbm_bandwidth_gbs: 3350.0
memory_gib: 79.6
flops_efficiency: 0.80
bandwidth_efficiency: 0.896
interconnect_gbs: 450.0
attention_block_cost:
  decode: {16: 1.0, 32: 1.0, 64: 0.996, 256: 0.997}
"""
QWEN, H100 = load_model("qwen3-0.6b"), HardwareSpec(**yaml.safe_load(H100_DATASHEET))
SCHED = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=2048)
GRAPHS = CudaGraphs.for_engine(SCHED.max_num_seqs, SCHED.max_num_batched_tokens, 256)
ROOFLINE = RooflineCostModel(QWEN, H100, graphs=GRAPHS)
CACHE = CacheConfig(block_size=16, enable_prefix_caching=True)


@dataclass(frozen=True)
class Request:
    """The fields the simulator reads (traces.Request has the same ones)."""
    request_id: str
    arrival_s: float
    prompt_token_ids: tuple
    output_len: int


def make_requests(n, rate, seed=0, prompt=(16, 300), output=(1, 40), prefixes=()):
    """Poisson arrivals, uniform lengths, random tokens; with `prefixes`, each prompt starts
    with one of them (round robin) and the group is in the request id."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        head = tuple(prefixes[i % len(prefixes)]) if prefixes else ()
        tail = tuple(rng.randrange(1, 30000) for _ in range(rng.randint(*prompt)))
        group = f"g{i % len(prefixes)}-" if prefixes else ""
        out.append(Request(f"{group}r{i}", t, head + tail, rng.randint(*output)))
    return out


def simulate(requests, sched=SCHED, cost=ROOFLINE, num_blocks=2000, **kw):
    return Simulator(sched, CACHE, cost, num_blocks, **kw).run(requests)


def timeline(result):
    return [(s.seq_id, s.arrival_time, s.first_scheduled_time, s.first_token_time,
             s.finish_time, tuple(s.token_times), s.num_preemptions) for s in result.sequences]


def median_ttft(result) -> float:
    return float(np.median([s.first_token_time - s.arrival_time for s in result.sequences]))


# ---- end to end --------------------------------------------------------------------
def test_every_request_runs_once_in_order_with_ordered_timestamps():
    requests = make_requests(150, rate=40.0)
    finished = []
    result = Simulator(SCHED, CACHE, ROOFLINE, 300).run(requests, progress=finished.append)
    assert [s.seq_id for s in result.sequences] == [r.request_id for r in requests]
    assert sum(finished) == len(requests)
    for req, seq in zip(requests, result.sequences):
        assert seq.is_finished and seq.finish_reason == "length"
        assert seq.num_output_tokens == req.output_len == len(seq.token_times)
        assert req.arrival_s == seq.arrival_time <= seq.first_scheduled_time
        assert seq.first_scheduled_time < seq.first_token_time <= seq.finish_time
        assert seq.token_times == sorted(seq.token_times) and seq.finish_time == seq.token_times[-1]
    assert result.duration_s == max(s.finish_time for s in result.sequences)
    steps = pd.DataFrame(result.steps)
    # steps of one replica never overlap, and the step log accounts for every output token
    ends = (steps["start_s"] + steps["duration_s"]).to_numpy()
    assert (steps["start_s"].to_numpy()[1:] >= ends[:-1] - 1e-12).all()
    assert steps["num_sampled"].sum() >= sum(r.output_len for r in requests)
    assert steps["step"].tolist() == list(range(len(steps)))
    assert ((steps["kv_usage"] > 0) & (steps["kv_usage"] <= 1)).all()


def test_small_pool_preempts_and_still_finishes_everything():
    requests = make_requests(60, rate=1000.0, prompt=(100, 200), output=(50, 100))
    result = simulate(requests, num_blocks=60)
    assert sum(s.num_preemptions for s in result.sequences) > 0
    assert all(s.is_finished and s.num_output_tokens == r.output_len
               for s, r in zip(result.sequences, requests))


def test_same_inputs_give_identical_results():
    requests = make_requests(120, rate=60.0, seed=3)
    sim = Simulator(SCHED, CACHE, ROOFLINE, 400, num_replicas=2, router="least_outstanding", seed=7)
    a, b = sim.run(requests), sim.run(requests)
    c = Simulator(SCHED, CACHE, ROOFLINE, 400, num_replicas=2, router="least_outstanding",
                  seed=7).run(requests)
    assert timeline(a) == timeline(b) == timeline(c)
    assert a.steps == b.steps == c.steps
    assert [s.token_ids for s in a.sequences] == [s.token_ids for s in c.sequences]


def test_outputs_differ_across_requests_and_seeds():
    requests = make_requests(10, rate=10.0)
    a, b = simulate(requests), Simulator(SCHED, CACHE, ROOFLINE, 2000, seed=1).run(requests)
    outputs = [tuple(s.output_token_ids) for s in a.sequences]
    assert len(set(outputs)) == len(outputs)
    assert outputs != [tuple(s.output_token_ids) for s in b.sequences]


def test_more_load_never_lowers_median_ttft():
    base = make_requests(200, rate=1.0, seed=5, prompt=(100, 400), output=(10, 60))
    ttfts = []
    for speedup in (1, 10, 100, 300, 1000):   # the same requests, arriving `speedup` times faster
        requests = [replace(r, arrival_s=r.arrival_s / speedup) for r in base]
        ttfts.append(median_ttft(simulate(requests)))
    assert ttfts == sorted(ttfts)
    assert ttfts[-1] > 2 * ttfts[0]   # the highest load queues


def test_idle_replica_wakes_on_arrival_and_never_steps_while_idle():
    early = make_requests(20, rate=50.0, seed=1)
    late = [replace(r, request_id="late-" + r.request_id, arrival_s=r.arrival_s + 100.0)
            for r in make_requests(20, rate=50.0, seed=2)]
    result = simulate(early + late)
    steps = pd.DataFrame(result.steps)
    early_done = max(s.finish_time for s in result.sequences[:20])
    assert early_done < 100.0
    in_gap = steps[(steps["start_s"] >= early_done) & (steps["start_s"] < late[0].arrival_s)]
    assert in_gap.empty
    assert steps["start_s"][steps["start_s"] >= early_done].min() == late[0].arrival_s


def test_bad_input_is_refused_with_the_request_named():
    requests = make_requests(5, rate=10.0)
    with pytest.raises(ValueError, match="sorted by arrival_s"):
        simulate(requests[::-1])
    too_long = Request("huge", 0.0, tuple(range(1, 3000)), 10)
    with pytest.raises(ValueError, match="huge"):
        simulate([too_long])
    with pytest.raises(ValueError, match="'r1' is used twice"):
        simulate([requests[0], requests[1], replace(requests[2], request_id="r1")])
    with pytest.raises(ValueError, match="router"):
        Simulator(SCHED, CACHE, ROOFLINE, 100, router="random")
    assert simulate([]).sequences == []


def test_step_features_match_batch_record():
    """The cost models' inputs are the steps.parquet columns, and mean what they say."""
    sched = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=512),
                      CACHE, num_blocks=40)
    for r in make_requests(30, rate=1.0, prompt=(5, 120), output=(1, 30),
                           prefixes=[tuple(range(1, 40))]):
        sched.add(Sequence(r.request_id, r.prompt_token_ids, r.output_len, ignore_eos=True))
    kinds = set()
    while sched.has_unfinished():
        batch = sched.schedule(0.0)
        features = batch.features()
        assert batch.record(1.0, 2.0) == {"start_s": 1.0, "duration_s": 2.0, **features}
        # the features by their definitions, entry by entry
        decode = [(c, n) for s, c, n in zip(batch.seqs, batch.num_computed_tokens, batch.num_new_tokens)
                  if n == 1 and c >= s.num_prompt_tokens]
        prefill = [(c, n) for s, c, n in zip(batch.seqs, batch.num_computed_tokens, batch.num_new_tokens)
                   if not (n == 1 and c >= s.num_prompt_tokens)]
        assert features["num_decode_seqs"] == len(decode)
        assert features["decode_context_tokens"] == sum(c + 1 for c, _ in decode)
        assert features["num_prefill_tokens"] == sum(n for _, n in prefill)
        assert features["prefill_context_tokens"] == sum(n * (c + n) for c, n in prefill)
        assert features["prefill_attention_pairs"] == sum(
            sum(c + i + 1 for i in range(n)) for c, n in prefill)
        assert features["num_sampled"] == sum(batch.sample)
        assert features["max_context_tokens"] == max(batch.context_lens)
        kinds.add((batch.num_prefill_tokens > 0, batch.num_decode_seqs > 0, batch.num_preempted > 0))
        sched.update(batch, [7] * len(batch), 0.0)
    assert {(True, True, False), (False, True, False), (True, False, False)} <= kinds


# ---- routers -----------------------------------------------------------------------
def test_round_robin_spreads_evenly():
    requests = make_requests(90, rate=30.0)
    result = simulate(requests, num_replicas=3, router="round_robin")
    assert [result.replica_of[r.request_id] for r in requests] == [i % 3 for i in range(90)]
    assert sorted({s["replica"] for s in result.steps}) == [0, 1, 2]


def test_least_outstanding_picks_the_least_loaded_replica():
    replicas = [Replica(i, Scheduler(SCHED, CACHE, 100)) for i in range(3)]
    for i, load in enumerate((3, 1, 2)):
        for j in range(load):
            replicas[i].scheduler.add(Sequence(f"{i}-{j}", [1, 2, 3], 5))
    seq = Sequence("new", [4, 5], 3)
    assert least_outstanding(seq, replicas, 0) == 1
    replicas[1].scheduler.add(Sequence("x", [1], 1))
    replicas[1].scheduler.add(Sequence("y", [1], 1))
    assert least_outstanding(seq, replicas, 0) == 2


def test_least_outstanding_balances_unequal_requests():
    """Long and short requests alternate: round robin piles every long one on replica 0;
    least_outstanding spreads the work so the run ends sooner."""
    rng = random.Random(0)
    requests = [Request(f"r{i}", i * 0.01, tuple(rng.randrange(1, 30000) for _ in range(64)),
                        400 if i % 2 == 0 else 2) for i in range(40)]
    rr = simulate(requests, num_replicas=2, router="round_robin")
    lo = simulate(requests, num_replicas=2, router="least_outstanding")
    def long_on(res):   # long requests per replica
        return [sum(1 for r in requests if r.output_len == 400 and res.replica_of[r.request_id] == k)
                for k in (0, 1)]
    assert long_on(rr) == [20, 0]
    assert max(long_on(lo)) < 20
    assert lo.duration_s < rr.duration_s


def test_prefix_affinity_keeps_a_shared_prefix_on_one_replica():
    rng = random.Random(1)
    prefixes = [tuple(rng.randrange(1, 30000) for _ in range(160)) for _ in range(3)]
    requests = make_requests(60, rate=50.0, prompt=(10, 60), output=(30, 60), prefixes=prefixes)
    affinity = simulate(requests, num_replicas=4, router="prefix_affinity")
    homes = []
    for g in range(3):
        group = [r.request_id for r in requests if r.request_id.startswith(f"g{g}-")]
        homes.append({affinity.replica_of[rid] for rid in group})
        assert len(homes[-1]) == 1, g
    assert len(set.union(*homes)) == 3    # with no cache hit anywhere, load decided: spread out
    rr = simulate(requests, num_replicas=4, router="round_robin")
    hit_rate = lambda res: sum(s.num_cached_tokens for s in res.sequences) / sum(
        s.num_prompt_tokens for s in res.sequences)
    assert hit_rate(affinity) > hit_rate(rr)


# ---- roofline ----------------------------------------------------------------------
def make_batch(entries, num_prompt_tokens=None):
    """A Batch of (start, n) entries; each sequence's prompt ends at `num_prompt_tokens`
    (default: start + n, i.e. prefill chunks), so (start >= prompt, n=1) entries decode."""
    batch = Batch()
    for i, (start, n) in enumerate(entries):
        prompt = num_prompt_tokens if num_prompt_tokens is not None else start + n
        seq = Sequence(i, [1] * max(prompt, 1), 16)
        seq.num_tokens = max(start + n, prompt)
        decode = n == 1 and start >= prompt
        batch.seqs.append(seq)
        batch.num_new_tokens.append(n)
        batch.num_computed_tokens.append(start)
        batch.sample.append(start + n == seq.num_tokens)
        batch.num_batched_tokens += n
        batch.num_decode_seqs += decode
        batch.num_prefill_tokens += 0 if decode else n
    return batch


def test_roofline_grows_with_batched_tokens_and_context():
    prefill = [ROOFLINE.step_time(make_batch([(0, n)])) for n in (16, 128, 1024, 4096, 8192)]
    assert prefill == sorted(prefill) and prefill[-1] > 4 * prefill[1]
    cached = [ROOFLINE.step_time(make_batch([(c, 512)])) for c in (0, 1024, 4096, 16384)]
    assert cached == sorted(cached) and cached[-1] > cached[0]
    decode_ctx = [ROOFLINE.step_time(make_batch([(c, 1)] * 64, num_prompt_tokens=1))
                  for c in (16, 256, 1024, 4096)]
    assert decode_ctx == sorted(decode_ctx) and decode_ctx[-1] > 2 * decode_ctx[0]
    decode_bs = [ROOFLINE.step_time(make_batch([(1024, 1)] * b, num_prompt_tokens=1))
                 for b in (1, 8, 64, 256)]
    assert decode_bs == sorted(decode_bs)


def test_roofline_decode_matches_the_bandwidth_bound_plus_overheads():
    """A decode step of 64 sequences at 1k context reads the weights once plus each
    sequence's KV (perf-anchors §3.2: 8.71 GB) at the achievable bandwidths, plus the
    fixed device costs."""
    b = 64
    graphs = CudaGraphs.for_engine(256, 8192, 512)
    hw = replace(H100, step_fixed_s=1e-4, layer_fixed_s=2e-6)
    t = RooflineCostModel(QWEN, hw, graphs=graphs).step_time(make_batch([(1023, 1)] * b, num_prompt_tokens=1))
    weights = QWEN.matmul_params * 2 + QWEN.lm_head_params * 2
    kv = b * 1024 * QWEN.kv_bytes_per_token()
    fixed = hw.step_fixed_s + hw.layer_fixed_s * QWEN.num_layers
    assert t == pytest.approx(weights / hw.bandwidth + kv / hw.attention_bandwidth + fixed, rel=1e-6)
    assert 8.6e9 < weights + kv < 8.8e9


def test_cuda_graph_padding_is_the_engines_rule_and_eager_steps_pay_launches():
    """The simulator pads a step with policy.cuda_graphs, the rule the engine captures and
    replays its graphs by: a decode batch of 33 (max_num_seqs 256) runs the 48-row graph."""
    graphs = CudaGraphs.for_engine(256, 8192, 512)
    assert graphs.decode == tuple(decode_sizes(256, 512)) and graphs.mixed == tuple(mixed_sizes(8192, 512))
    for entries, prompt in (([(100, 1)] * 33, 1), ([(100, 1)] * 300, 1), ([(0, 100)], None),
                            ([(0, 600)], None), ([(0, 20)] + [(100, 1)] * 3, None)):
        f = make_batch(entries, prompt).features()
        kind, rows = graphs.rows(f)
        assert (kind, rows) == graph_rows(f["num_batched_tokens"], f["num_seqs"],
                                          f["num_prefill_tokens"] == 0, graphs.decode, graphs.mixed)
    assert graphs.rows(make_batch([(100, 1)] * 33, 1).features()) == ("decode", 48)
    assert graphs.rows(make_batch([(0, 600)]).features()) == ("eager", 600)
    assert CudaGraphs.for_engine(256, 8192, 0) == CudaGraphs()       # enforce_eager
    eager = RooflineCostModel(QWEN, H100, graphs=CudaGraphs())
    graphed = RooflineCostModel(QWEN, H100, graphs=CudaGraphs.for_engine(16, 512, 512))
    batch = make_batch([(100, 1)] * 4, num_prompt_tokens=1)
    assert eager.step_time(batch) == pytest.approx(graphed.step_time(batch) + H100.layer_launch_s * QWEN.num_layers)
    # padding: a 3-sequence decode costs what the 4-row graph costs
    assert graphed.step_time(make_batch([(100, 1)] * 3, 1)) == pytest.approx(
        graphed.step_time(make_batch([(100, 1)] * 4, 1)) - (graphed.kv_read_s * 101), rel=1e-9)


def test_tensor_parallel_splits_the_work_and_pays_for_all_reduce():
    llama = load_model("llama-3.1-8b")
    batch = make_batch([(2048, 1)] * 128, num_prompt_tokens=1)
    tp1, tp2 = RooflineCostModel(llama, H100, 1), RooflineCostModel(llama, H100, 2)
    assert tp2.step_time(batch) < tp1.step_time(batch)
    no_link = replace(H100, interconnect_gbs=0.0)
    with pytest.raises(ValueError, match="interconnect"):
        RooflineCostModel(llama, no_link, 2)
    with pytest.raises(ValueError, match="tp=3"):
        RooflineCostModel(llama, H100, 3)


# ---- model, hardware and the KV pool -----------------------------------------------
def test_model_spec_counts_parameters_like_hugging_face():
    # published parameter counts of the two models
    assert QWEN.num_params == 596_049_920
    assert load_model("llama-3.1-8b").num_params == 8_030_261_248
    assert QWEN.kv_bytes_per_token() == 28 * 2 * 8 * 128 * 2
    with pytest.raises(ValueError, match="'broken'.*architecture"):
        ModelSpec.from_hf_config({"hidden_size": 8}, name="broken")
    with pytest.raises(ValueError, match="mixture-of-experts"):
        ModelSpec.from_hf_config({"architectures": ["Qwen3ForCausalLM"], "num_experts": 8})


def test_every_hardware_file_loads_and_bad_values_are_refused():
    files = sorted((ROOT / "conf" / "hardware").glob("*.yaml"))
    assert {f.stem for f in files} >= {"h100", "h200", "a100-80gb", "l40s", "rtx4090"}
    for f in files:
        assert HardwareSpec(**yaml.safe_load(open(f))).name == f.stem
    with pytest.raises(ValueError, match="bandwidth_efficiency"):
        replace(H100, bandwidth_efficiency=1.5)
    with pytest.raises(ValueError, match="memory_gib"):
        replace(H100, memory_gib=0)


def test_kv_pool_shrinks_with_utilization_and_model_size():
    blocks = [kv_pool_blocks(QWEN, H100, 16, u) for u in (0.5, 0.7, 0.9)]
    assert blocks == sorted(blocks) and blocks[0] < blocks[-1]
    llama8 = load_model("llama-3.1-8b")
    assert kv_pool_blocks(llama8, H100, 16, 0.9) < blocks[-1]
    # per GPU, tensor parallelism halves the weights and the KV heads: more blocks
    assert kv_pool_blocks(llama8, H100, 16, 0.9, tp=2) > kv_pool_blocks(llama8, H100, 16, 0.9)
    # bigger blocks: fewer of them, about the same tokens
    assert kv_pool_blocks(QWEN, H100, 32, 0.9) == pytest.approx(blocks[-1] / 2, abs=1)
    with pytest.raises(ValueError, match="does not fit"):
        kv_pool_blocks(load_model("llama-3.1-70b"), load_hardware("rtx4090"), 16, 0.9)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        kv_pool_blocks(QWEN, H100, 16, 1.5)


# ---- fitted and replay cost models -------------------------------------------------
def roofline_profile(cost, sched=SCHED, graphs=GRAPHS, num_blocks=4000):
    """A profile of the grid with device times from a roofline (a stand-in for the engine)."""
    rows = []
    for point in profile_grid(sched.max_num_seqs, sched.max_num_batched_tokens, sched.max_model_len, graphs):
        f = shape_batch(point["shape"], 16, num_blocks).features()
        kind, padded = graphs.rows(f)
        rows.append({**f, "kind": kind, "rows": padded, "split": point["split"],
                     "device_s": cost.predict(f), "host_launch_s": 2e-4 + 3e-6 * f["num_seqs"],
                     "host_receive_s": 5e-5 + 1e-6 * f["num_seqs"]})
    return pd.DataFrame(rows)


def test_profile_grid_covers_every_graph_and_holds_out_shapes():
    grid = profile_grid(SCHED.max_num_seqs, SCHED.max_num_batched_tokens, SCHED.max_model_len, GRAPHS)
    fs = [(shape_batch(p["shape"], 16, 1000).features(), p["split"]) for p in grid]
    kinds = {}
    for f, split in fs:
        assert f["num_batched_tokens"] <= SCHED.max_num_batched_tokens and f["num_seqs"] <= SCHED.max_num_seqs
        kind, rows = GRAPHS.rows(f)
        kinds.setdefault((kind, split), set()).add(rows)
    assert kinds[("decode", "train")] == set(GRAPHS.decode)
    assert kinds[("mixed", "train")] == set(GRAPHS.mixed)
    assert kinds[("eager", "train")] and kinds[("eager", "held_out")]
    assert kinds[("decode", "held_out")] and kinds[("mixed", "held_out")]
    # graphs up to the whole budget (the engine's default): no step runs eagerly, none exceeds it
    full = CudaGraphs.for_engine(256, 8192, 8192)
    for p in profile_grid(256, 8192, 8192, full):
        f = shape_batch(p["shape"], 16, 1000).features()
        assert f["num_batched_tokens"] <= 8192 and f["num_seqs"] <= 256
        assert full.rows(f)[0] != "eager"


def test_fit_on_a_profile_predicts_held_out_shapes_and_runs(tmp_path):
    """The fitted model, fitted on a profile of a known cost (the roofline), predicts the
    held-out shapes and a simulated run's steps closely; the file round-trips."""
    profile = roofline_profile(ROOFLINE)
    meta = {"model": "qwen3-0.6b", "device": "roofline stand-in", "command": "pytest"}
    calib = fit_calibration(profile, meta)
    assert set(calib["kinds"]) == {"decode", "mixed", "eager"}
    for kind, fit in calib["kinds"].items():
        assert fit["held_out"]["mape"] < 0.05, kind
        assert all(c >= 0 for c in fit["coefficients"].values())
        # the variant kept (form x optional features) is the one with the lowest held-out error,
        # but a feature leaves only where the fit without it wins by more than a standard error
        assert {"piecewise", "linear"} <= set(fit["forms"]) and fit["variant"].startswith(fit["form"])
        chosen, lowest = fit["forms"][fit["variant"]], min(fit["forms"], key=fit["forms"].get)
        assert chosen == fit["held_out"]["mape"]
        assert chosen <= fit["forms"][lowest] + TIE_MAPE or (
            " without " in lowest and " without " not in fit["variant"]
            and fit["forms"][lowest] >= chosen - fit["held_out"]["se"]), (kind, fit["variant"], lowest)
    assert calib["host"]["launch_s"] == pytest.approx(2e-4) and calib["host"]["receive_seq_s"] == pytest.approx(1e-6)
    fitted = FittedCostModel(calib, graphs=GRAPHS)
    requests = make_requests(200, rate=80.0, seed=11, prompt=(16, 600), output=(1, 60))
    run = simulate(requests)
    predicted = np.array([fitted.predict(f) for f in run.steps])
    truth = np.array([ROOFLINE.predict(f) for f in run.steps])
    assert np.mean(np.abs(predicted - truth) / truth) < 0.05
    # the same check on a run's recorded steps, by step kind (what --check-steps prints)
    errors = step_errors(calib, GRAPHS, pd.DataFrame(run.steps))
    assert sum(e["n"] for e in errors.values()) == len(run.steps)
    assert all(abs(e["median_error"]) < 0.05 for e in errors.values())
    assert sum(e["measured_s"] for e in errors.values()) == pytest.approx(truth.sum())
    # CLI: re-fit the saved profile; loads back through the config
    profile.to_parquet(tmp_path / "c.profile.parquet")
    (tmp_path / "c.json").write_text(json.dumps(calib))
    pd.DataFrame(run.steps).to_parquet(tmp_path / "steps.parquet")
    calibrate.main([str(tmp_path / "c.profile.parquet"), "--out", str(tmp_path / "refit.json"),
                    "--check-steps", str(tmp_path / "steps.parquet")])
    loaded = build_cost_model(CostModelConfig(kind="fitted", path=str(tmp_path / "refit.json")), QWEN,
                              H100, graphs=GRAPHS)
    assert [loaded.predict(f) for f in run.steps] == pytest.approx(predicted.tolist())


def test_fit_hardware_recovers_the_roofline_parameters():
    """Roofline efficiencies and fixed costs fitted on a profile the roofline itself made
    (with other parameters) predict it again."""
    truth_hw = replace(H100, flops_efficiency=0.5, bandwidth_efficiency=0.7,
                       attention_bandwidth_efficiency=0.4, step_fixed_s=3e-4, layer_launch_s=50e-6)
    truth = RooflineCostModel(QWEN, truth_hw, graphs=GRAPHS)
    profile = roofline_profile(truth)
    fitted, report = fit_hardware(profile, QWEN, H100, 1, GRAPHS, sweeps=3)
    assert max(report.values()) < 0.05
    assert fitted.step_overhead_s == pytest.approx(2e-4) and fitted.seq_overhead_s == pytest.approx(3e-6)


def test_calibration_files_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs cost_model.path.*experiments.calibrate"):
        CostModelConfig(kind="fitted")
    calib = fit_calibration(roofline_profile(ROOFLINE), {"model": "qwen3-0.6b", "device": "d", "command": "c"})
    path = tmp_path / "c.json"
    path.write_text(json.dumps(calib))
    cfg = CostModelConfig(kind="fitted", path=str(path))
    with pytest.raises(ValueError, match="not 'llama-3.1-8b'"):
        build_cost_model(cfg, load_model("llama-3.1-8b"), H100)
    with pytest.raises(ValueError, match="tp=2"):
        build_cost_model(cfg, QWEN, H100, tp=2)
    with pytest.raises(ValueError, match="format"):
        FittedCostModel(dict(calib, format="twinserve-calibration/1"))
    with pytest.raises(ValueError, match="no step kinds"):
        FittedCostModel(dict(calib, kinds={}))
    with pytest.raises(ValueError, match="no train rows"):
        fit_calibration(roofline_profile(ROOFLINE).query("split != 'train'"), {"model": "m", "device": "d", "command": "c"})
    # a step of a kind never profiled (here: eager, with graphs up to the budget) is costed
    # by the fitted mixed kind at its tokens
    mixed = calib["kinds"]["mixed"]
    mixed_only = FittedCostModel(dict(calib, kinds={"mixed": mixed}), graphs=CudaGraphs())
    f = make_batch([(0, 300)]).features()
    value = {**f, **{name: compute(f) for name, compute in mixed_only.computed.items()}}   # (computed features too)
    expected = base_time(mixed["knots"], mixed["base_s"], 300) + sum(
        c * value[name] for name, c in mixed["coefficients"].items())
    assert mixed_only.predict(f) == pytest.approx(expected) and expected > 0
    with pytest.raises(ValueError, match="needs cost_model.path"):
        CostModelConfig(kind="replay")
    with pytest.raises(FileNotFoundError, match="nowhere.parquet"):
        build_cost_model(CostModelConfig(kind="replay", path="nowhere.parquet"), QWEN, H100)
    assert not list((ROOT / "simulator" / "calibrations").glob("example-*"))   # no synthetic example


@pytest.fixture(scope="module")
def roofline_run():
    requests = make_requests(300, rate=80.0, seed=11, prompt=(16, 600), output=(1, 60))
    return requests, simulate(requests)


SHAPE_AND_TIMES = list(ReplayCostModel.SHAPE) + ["start_s", "launch_s", "tokens_s", "end_s"]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_replay_reproduces_a_run_step_for_step(tmp_path, async_scheduling):
    requests = make_requests(300, rate=80.0, seed=11, prompt=(16, 600), output=(1, 60))
    result = simulate(requests, async_scheduling=async_scheduling)
    pd.DataFrame(result.steps).to_parquet(tmp_path / "steps.parquet")
    cfg = CostModelConfig(kind="replay", path=str(tmp_path / "steps.parquet"))
    replay = build_cost_model(cfg, QWEN, H100)
    replayed = simulate(requests, cost=replay, async_scheduling=async_scheduling)
    assert replayed.replayed_steps == len(result.steps)
    key = lambda steps: [{k: s[k] for k in SHAPE_AND_TIMES} for s in steps]   # noqa: E731
    assert key(replayed.steps) == key(result.steps)
    assert timeline(replayed) == timeline(result)


def test_async_scheduling_forms_the_next_step_while_one_runs():
    """With async scheduling step N+1 is formed right after step N's launch, before its
    tokens exist: a request arriving while step N runs first runs in step N+2. Without,
    each step is formed after the previous one's tokens arrived."""
    requests = make_requests(80, rate=60.0, seed=4, prompt=(16, 300), output=(5, 40))
    for mode in (True, False):
        steps = pd.DataFrame(simulate(requests, async_scheduling=mode).steps)
        formed_before_tokens = (steps["start_s"].to_numpy()[1:] < steps["tokens_s"].to_numpy()[:-1])
        assert formed_before_tokens.mean() > 0.9 if mode else not formed_before_tokens.any()
    # host time the device does not hide makes a run slower; async hides most of it
    slow_host = replace(H100, step_overhead_s=2e-3, update_overhead_s=1e-3)
    costs = RooflineCostModel(QWEN, slow_host, graphs=GRAPHS)
    sync, overlapped = (simulate(requests, cost=costs, async_scheduling=m) for m in (False, True))
    assert overlapped.duration_s < sync.duration_s


def test_replay_raises_when_the_schedules_diverge(roofline_run):
    requests, result = roofline_run
    steps = pd.DataFrame(result.steps)
    other_policy = replace(SCHED, max_num_seqs=4)
    with pytest.raises(RuntimeError, match="diverged at step"):
        simulate(requests, sched=other_policy, cost=ReplayCostModel(steps))
    with pytest.raises(RuntimeError, match="records only 10 steps"):
        simulate(requests, cost=ReplayCostModel(steps.head(10)))
    with pytest.raises(RuntimeError, match="diverged"):     # the record is longer: a workload differs
        simulate(requests[:-30], cost=ReplayCostModel(steps))
    # without strict, only running out of steps or time is an error: shapes go unchecked
    loose = simulate(requests[:20], cost=ReplayCostModel(steps[["start_s", "launch_s", "tokens_s", "end_s"]],
                                                         strict=False))
    assert all(s.is_finished for s in loose.sequences)
    with pytest.raises(ValueError, match="step times"):
        ReplayCostModel(steps[["duration_s", "num_seqs"]])
    with pytest.raises(ValueError, match="num_replicas=1"):
        Simulator(SCHED, CACHE, ReplayCostModel(steps), 2000, num_replicas=2)
    with pytest.raises(ValueError, match="one replica"):
        ReplayCostModel(steps.assign(replica=[0, 1] * (len(steps) // 2) + [0] * (len(steps) % 2)))


def test_calibration_json_is_plain_data():
    calib = fit_calibration(roofline_profile(ROOFLINE), {"model": "m", "device": "d", "command": "c"})
    assert json.loads(json.dumps(calib)) == calib
