"""The fidelity table's policy-effect test (benchmarks/fidelity/run_fidelity.py pair_effect)."""
import bench_scripts

run_fidelity = bench_scripts.load("benchmarks/fidelity/run_fidelity.py")


def side(real, sim, spread):
    return {"real": real, "sim": sim, "real_spread": spread}


def test_effect_within_target_needs_sign_and_distance():
    e = run_fidelity.pair_effect(side(100, 100, 0.01), side(110, 112, 0.01), "mean_tpot_ms")
    assert abs(e["measured_change"] - 0.10) < 1e-12 and abs(e["predicted_change"] - 0.12) < 1e-12
    assert e["same_sign"] and e["within_target"] and e["beyond_spread"]
    far = run_fidelity.pair_effect(side(100, 100, 0.01), side(110, 114, 0.01), "mean_tpot_ms")
    assert far["same_sign"] and not far["within_target"]             # 4 points off: TPOT allows 3
    ttft = run_fidelity.pair_effect(side(100, 100, 0.01), side(110, 114, 0.01), "mean_ttft_ms")
    assert ttft["within_target"]                                       # TTFT allows 5
    flipped = run_fidelity.pair_effect(side(100, 100, 0.01), side(101, 99, 0.01), "mean_tpot_ms")
    assert not flipped["same_sign"] and not flipped["within_target"]


def test_effect_inside_the_repeats_spread_is_flagged():
    small = run_fidelity.pair_effect(side(100, 100, 0.02), side(101, 99, 0.005), "request_throughput")
    assert not small["beyond_spread"]          # 1% change, 2% spread on side A
    clear = run_fidelity.pair_effect(side(100, 100, 0.02), side(105, 104, 0.005), "request_throughput")
    assert clear["beyond_spread"]


def test_within_targets_counts_cells_below_capacity_by_each_models_tolerance():
    import pandas as pd
    rows = []
    for trace, below, pair in (("a", True, None), ("a", False, None), ("b", True, None), ("b", True, "policy")):
        for model, err in (("fitted", 0.03), ("roofline", 0.12)):
            for metric in ("request_throughput", "mean_ttft_ms", "mean_tpot_ms", "p99_ttft_ms"):
                rows.append({"trace": trace, "below_capacity": below, "pair": pair, "cost_model": model,
                             "metric": metric, "error": err if trace == "a" else -0.01})
    w = run_fidelity.within_targets(pd.DataFrame(rows)).set_index(["cost_model", "trace"])
    # p99 carries no target; the cell past capacity and the pair's row are not counted
    assert w.loc[("fitted", "a"), "of"] == 3 and w.loc[("fitted", "b"), "of"] == 3
    assert w.loc[("fitted", "a"), "within"] == 1          # 3% passes only TTFT's 5%
    assert w.loc[("fitted", "b"), "within"] == 3
    assert w.loc[("roofline", "a"), "within"] == 3        # 12% is within the roofline's 15%
    assert w.loc[("fitted", "all"), "within"] == 4 and w.loc[("fitted", "all"), "of"] == 6


def write_run(d, ttft, e2e, tokens, scale=1.0):
    """A run folder of requests (arrival 0.1 s apart) whose times after arrival are
    `scale` x the given ones: TTFT, E2E and `tokens` output tokens evenly in between."""
    import numpy as np
    import pandas as pd
    rows = []
    for i, (t, e, n) in enumerate(zip(ttft, e2e, tokens)):
        arrival = 0.1 * i
        times = arrival + scale * np.linspace(t, e, n)
        rows.append({"request_id": f"r{i}", "arrival_s": arrival, "first_token_s": times[0], "finish_s": times[-1],
                     "prompt_len": 10, "output_len": n, "finish_reason": "length", "token_times_s": list(times)})
    d.mkdir(parents=True)
    pd.DataFrame(rows).to_parquet(d / "requests.parquet")
    return d


def requests(seed):
    import numpy as np
    rng = np.random.default_rng(seed)
    ttft = rng.lognormal(-4, 1, 60)
    return ttft, ttft + rng.uniform(0.05, 2.0, 60), rng.integers(2, 40, 60)


def test_sampling_interval_is_paired_and_follows_a_uniform_change(tmp_path):
    """One draw of requests for both sides: identical sides give no interval at all however
    spread the requests, every latency 20% longer gives exactly +20% in every draw; the
    throughputs (counts over a duration) get none."""
    a = [write_run(tmp_path / f"a{r}", *requests(r)) for r in range(2)]
    same = [write_run(tmp_path / f"same{r}", *requests(r)) for r in range(2)]
    slow = [write_run(tmp_path / f"slow{r}", *requests(r), scale=1.2) for r in range(2)]
    for b, change in ((same, 0.0), (slow, 0.2)):
        intervals = run_fidelity.sampling_interval(a, b, draws=50)
        assert intervals["request_throughput"] is None and intervals["output_throughput"] is None
        for metric in ("mean_ttft_ms", "p90_ttft_ms", "median_tpot_ms", "p99_itl_ms", "mean_e2el_ms"):
            lo, hi = intervals[metric]
            assert abs(lo - change) < 1e-9 and abs(hi - change) < 1e-9, metric


def test_sampling_interval_widens_for_a_tail_changed_by_few_requests(tmp_path):
    import numpy as np
    a = [write_run(tmp_path / "a", *requests(0))]
    ttft, e2e, tokens = requests(0)
    worst = np.argsort(ttft)[-3:]                 # the three slowest first tokens take 3x longer
    ttft, e2e = ttft.copy(), e2e.copy()
    e2e[worst] += 2 * ttft[worst]
    ttft[worst] *= 3
    b = [write_run(tmp_path / "b", ttft, e2e, tokens)]
    intervals = run_fidelity.sampling_interval(a, b, draws=200)
    p99, median = intervals["p99_ttft_ms"], intervals["median_ttft_ms"]
    assert p99[0] < p99[1] and p99[1] - p99[0] > 0.2      # which of the three a draw holds moves p99
    assert abs(median[0]) < 1e-9 and abs(median[1]) < 1e-9   # the middle of the requests never moves


def test_summary_counts_the_misses_inside_the_sampling_interval():
    import pandas as pd
    effects = pd.DataFrame([
        {"cost_model": "fitted", "within_target": True, "within_sampling": True, "beyond_spread": True},
        {"cost_model": "fitted", "within_target": False, "within_sampling": True, "beyond_spread": False},
        {"cost_model": "fitted", "within_target": False, "within_sampling": False, "beyond_spread": True}])
    summary = run_fidelity.summarize(pd.DataFrame(), effects, pd.DataFrame())
    assert summary["effects_within_target"] == {"fitted": "1/3"}
    assert summary["effects_missed_within_sampling"] == {"fitted": "1/2"}


def test_sampling_interval_needs_requests_both_sides_completed(tmp_path):
    import pandas as pd
    import pytest
    a = write_run(tmp_path / "x" / "r0", *requests(0))
    b = write_run(tmp_path / "y" / "r0", *requests(1))
    df = pd.read_parquet(b / "requests.parquet")
    df.assign(request_id="other-" + df["request_id"]).to_parquet(b / "requests.parquet")
    with pytest.raises(ValueError, match="x -> y: no request completed"):
        run_fidelity.sampling_interval([a], [b], draws=5)
