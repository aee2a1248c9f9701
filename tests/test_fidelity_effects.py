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
