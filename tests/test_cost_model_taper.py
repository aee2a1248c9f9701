"""Decodes that re-read shared KV blocks (prefix-cache hits): a re-read saves less the larger the
re-read share of the step's KV (decode_reread_share_tokens, the taper), the fit keeps the taper only
where it pays beyond the held-out noise and only with the re-read's saving itself, and the profiling grid holds serving's shared steps (a small
shared prefix under every decode; several prompts behind cached context beside decodes)."""
import numpy as np
import pandas as pd
import pytest

from simulator import CudaGraphs
from simulator.calibrate import with_causal_pairs
from simulator.profile_grid import profile_grid, shape_batch
from simulator.cost_model import (CALIBRATION_FORMAT, TAPER_FEATURE, FittedCostModel,
                                  decode_reread_share_tokens, fit_kind)

SHARED = "decode_distinct_context_tokens"


def decode_features(contexts, shared_tokens):
    """Features of a decode step whose sequences share their first `shared_tokens` (one group)."""
    return shape_batch([(c, 1, shared_tokens, 0) for c in contexts], 16, 1 << 14).features()


def test_the_taper_is_zero_without_rereads_and_grows_with_their_share():
    alone = decode_features([1024] * 8, 0)
    assert alone[SHARED] == alone["decode_context_tokens"] and decode_reread_share_tokens(alone) == 0
    low, high = decode_features([1024] * 8, 256), decode_features([1024] * 8, 896)
    for f in (low, high):
        reread = f["decode_context_tokens"] - f[SHARED]
        assert reread > 0
        assert decode_reread_share_tokens(f) == pytest.approx(reread ** 2 / f["decode_context_tokens"])
    # per re-read token, the taper (the saving it takes back) grows with the share
    per = [decode_reread_share_tokens(f) / (f["decode_context_tokens"] - f[SHARED]) for f in (low, high)]
    assert per[0] < per[1]
    table = with_causal_pairs(pd.DataFrame([alone, low, high]))
    assert table[TAPER_FEATURE].tolist() == pytest.approx([decode_reread_share_tokens(f) for f in (alone, low, high)])


def test_the_fitted_model_prices_the_taper_from_the_features():
    calib = {"format": CALIBRATION_FORMAT, "kinds": {"decode": {
        "knots": [1, 64], "base_s": [1e-3, 1e-3],
        "coefficients": {"decode_context_tokens": 5e-9, SHARED: 10e-9, TAPER_FEATURE: 4e-9}}}}
    model = FittedCostModel(calib)
    f = decode_features([2048] * 8, 1024)
    without = FittedCostModel({**calib, "kinds": {"decode": {**calib["kinds"]["decode"], "coefficients": {
        "decode_context_tokens": 5e-9, SHARED: 10e-9}}}})
    assert model.predict(f) - without.predict(f) == pytest.approx(4e-9 * decode_reread_share_tokens(f))
    assert model.predict(decode_features([2048] * 8, 0)) == without.predict(decode_features([2048] * 8, 0))


def synthetic_profile(taper_s: float, rng) -> pd.DataFrame:
    """Decode shapes at 4 batch sizes and re-read shares 0-7/8, timed as fixed + first reads
    + re-reads whose saving shrinks with their share (taper_s per R^2/C), 0.3% noise."""
    rows = []
    for b in (4, 8, 16, 32):
        for ctx in (512, 1024, 2048, 4096):
            for frac in (0, 1 / 8, 1 / 4, 3 / 8, 1 / 2, 3 / 4, 7 / 8):
                f = decode_features([ctx] * b, int(ctx * frac) // 16 * 16)
                C, D = f["decode_context_tokens"], f[SHARED]
                t = 1e-3 + 20e-9 * D + 4e-9 * (C - D) + taper_s * decode_reread_share_tokens(f)
                rows.append({**f, "rows": b, "device_s": t * (1 + 0.003 * rng.standard_normal()),
                             "split": "held_out" if frac in (1 / 8, 3 / 8) else "train"})
    return with_causal_pairs(pd.DataFrame(rows))


def test_the_fit_keeps_the_taper_only_where_it_pays_beyond_the_held_out_noise():
    rng = np.random.default_rng(0)
    features = ["decode_context_tokens", SHARED, TAPER_FEATURE]
    p = synthetic_profile(12e-9, rng)
    fit = fit_kind(p[p.split == "train"], p[p.split != "train"], features, optional=(SHARED,),
                   earn=(TAPER_FEATURE,))
    assert fit["variant"].endswith(f"with {TAPER_FEATURE}") and SHARED in fit["coefficients"]
    assert fit["coefficients"][TAPER_FEATURE] == pytest.approx(12e-9, rel=0.25)
    assert fit["forms"][fit["variant"]] < fit["forms"]["piecewise"]
    # re-reads that save the same at every share: the fit stays as it is without the taper
    flat = synthetic_profile(0.0, rng)
    fit = fit_kind(flat[flat.split == "train"], flat[flat.split != "train"], features, optional=(SHARED,),
                   earn=(TAPER_FEATURE,))
    assert TAPER_FEATURE not in fit["coefficients"] and "with" not in fit["variant"]
    assert any(k.endswith(f"with {TAPER_FEATURE}") for k in fit["forms"])      # tried, not kept


def test_no_fitted_variant_has_the_taper_without_the_reread(monkeypatch):
    """Alone, the taper's coefficient would make a re-read cost more than a first read."""
    import simulator.cost_model as cm
    tried = []
    fit_base = cm._fit_base

    def spy(train, test, features, knots, **kw):
        tried.append(list(features))
        return fit_base(train, test, features, knots, **kw)
    monkeypatch.setattr(cm, "_fit_base", spy)
    p = synthetic_profile(12e-9, np.random.default_rng(1))
    cm.fit_kind(p[p.split == "train"], p[p.split != "train"], ["decode_context_tokens", SHARED, TAPER_FEATURE],
                optional=(SHARED,), earn=(TAPER_FEATURE,))
    assert any(TAPER_FEATURE in f for f in tried) and any(SHARED not in f for f in tried)
    assert all(SHARED in f for f in tried if TAPER_FEATURE in f)


def test_grid_profiles_serving_decodes_sharing_a_small_prefix_and_prompts_behind_cached_context():
    S, M, L = 256, 8192, 8192
    graphs = CudaGraphs.for_engine(S, M, M)
    low_share, bursts = {}, {}
    for p in profile_grid(S, M, L, graphs):
        f = shape_batch(p["shape"], 16, 1 << 20).features()
        chunks = [e for e in p["shape"] if e[1] > 1]
        if not chunks and f["num_seqs"] >= 2:
            share = 1 - f[SHARED] / f["decode_context_tokens"]
            if 0 < share <= 0.3:
                low_share.setdefault(graphs.rows(f)[1], set()).add(p["split"])
        if len(chunks) >= 2 and f["num_decode_seqs"] and min(c - n for c, n, *_ in chunks) >= 256:
            assert f["num_batched_tokens"] in graphs.mixed
            bursts.setdefault(len(chunks), set()).add(p["split"])
    # every decode graph size of serving's range has shared decodes re-reading <= 30% of their
    # KV, fitted and held out
    assert {b for b in graphs.decode if 4 <= b <= 64} <= set(low_share)
    assert set().union(*low_share.values()) == {"train", "held_out"}
    assert set(bursts) == {2, 3, 4, 6} and all(s == {"train", "held_out"} for s in bursts.values())


def test_grid_pairs_serving_decodes_under_a_system_prompt_with_unshared_twins():
    """mooncake_conv's decode steps (a 512-token prefix under every decode of 2-4k tokens: 10-20%
    of the KV re-read) beside twins of the same contexts sharing nothing, the pair in one split."""
    S, M, L = 256, 8192, 8192
    graphs = CudaGraphs.for_engine(S, M, M)
    grid = profile_grid(S, M, L, graphs)
    unshared = {}
    for p in grid:
        if all(len(e) == 2 and e[1] == 1 for e in p["shape"]):
            unshared.setdefault(tuple(map(tuple, p["shape"])), set()).add(p["split"])
    pairs = {}
    for p in grid:
        shape = p["shape"]
        if len(shape) < 2 or not all(len(e) == 4 and e[1] == 1 and e[2] == 512 for e in shape):
            continue
        f = shape_batch(shape, 16, 1 << 20).features()
        share = 1 - f[SHARED] / f["decode_context_tokens"]
        twin = tuple((c, n) for c, n, *_ in shape)
        if share <= 0.2 and twin in unshared:
            assert p["split"] in unshared[twin]
            pairs.setdefault(len(shape), set()).add(p["split"])
    assert {2, 4, 8, 16, 32, 64} <= set(pairs)
    assert set().union(*pairs.values()) == {"train", "held_out"}


def test_reread_savings_measure_each_twin_pair_against_the_fit(capsys):
    """Measured: (twin - shared) device time per re-read token; the fit's: its price of the shared
    shape as if unshared, less its price. A shared shape without a twin is left out."""
    import json
    from simulator.calibrate import print_reread_savings, reread_savings
    graphs = CudaGraphs.for_engine(256, 8192, 8192)
    rows = []
    def add(shape, split="train"):
        f = shape_batch(shape, 16, 1 << 14).features()
        reread = f["decode_context_tokens"] - f[SHARED]
        saving = 14e-9 if reread / f["decode_context_tokens"] < 0.3 else 9e-9      # planted
        t = 1e-3 + 25e-9 * f["decode_context_tokens"] - saving * reread
        rows.append({**f, "kind": "decode", "rows": graphs.rows(f)[1], "split": split, "device_s": t,
                     "shape": json.dumps(shape)})
    for b, ctx, shared in ((8, 2048, 256), (16, 3072, 512), (32, 1024, 768)):
        add([(ctx, 1)] * b)
        add([(ctx, 1, shared, 0)] * b)
    add([(4096, 1, 512, 0)] * 8)                                    # no twin
    calib = {"format": CALIBRATION_FORMAT, "kinds": {"decode": {
        "knots": [1, 256], "base_s": [1e-3, 1e-3], "coefficients": {"decode_context_tokens": 15e-9, SHARED: 10e-9}}}}
    table = reread_savings(calib, graphs, pd.DataFrame(rows))
    assert sorted(table["rows"]) == [8, 16, 32]
    low = table["share"] < 0.3
    assert table.loc[low, "measured_ns"].tolist() == pytest.approx([14.0, 14.0])
    assert table.loc[~low, "measured_ns"].tolist() == pytest.approx([9.0])
    assert table["fit_ns"].tolist() == pytest.approx([10.0] * 3)
    print_reread_savings(table)
    out = capsys.readouterr().out
    assert "measured   14.0  fit   10.0" in out and "measured    9.0  fit   10.0" in out
    assert reread_savings(calib, graphs, pd.DataFrame(rows).drop(columns=["shape"])).empty



def diluted_profile(taper_s: float, rng) -> pd.DataFrame:
    """As synthetic_profile, but most shapes re-read nothing (8 unshared shapes for each shared
    one, as in a serving profile): the taper prices a few shapes of the kind."""
    rows = []
    for b in (4, 8, 16, 32):
        for ctx in (512, 1024, 2048, 4096):
            fracs = [0] * 32 + [1 / 8, 1 / 4, 1 / 2, 3 / 4]
            for i, frac in enumerate(fracs):
                f = decode_features([ctx + 16 * i * (frac == 0)] * b, int(ctx * frac) // 16 * 16)
                C, D = f["decode_context_tokens"], f[SHARED]
                t = 1e-3 + 20e-9 * D + 4e-9 * (C - D) + taper_s * decode_reread_share_tokens(f)
                rows.append({**f, "rows": b, "device_s": t * (1 + 0.003 * rng.standard_normal()),
                             "split": "held_out" if i % 3 == 1 else "train"})
    return with_causal_pairs(pd.DataFrame(rows))


def test_the_taper_is_judged_on_the_shapes_it_prices_not_diluted_by_the_rest():
    import simulator.cost_model as cm
    p = diluted_profile(2e-9, np.random.default_rng(0))
    train, test = p[p.split == "train"], p[p.split != "train"]
    features = ["decode_context_tokens", SHARED]
    knots = sorted(set(train["rows"].astype(int)))
    without = cm._fit_base(train, test, features, knots)["held_out"]
    with_taper = cm._fit_base(train, test, features + [TAPER_FEATURE], knots)["held_out"]
    # the scenario: over the whole kind, the taper's gain is inside the noise
    assert without["mape"] - with_taper["mape"] < without["se"]
    fit = fit_kind(train, test, features + [TAPER_FEATURE], optional=(SHARED,), earn=(TAPER_FEATURE,))
    assert fit["variant"].endswith(f"with {TAPER_FEATURE}")
    assert fit["coefficients"][TAPER_FEATURE] == pytest.approx(2e-9, rel=0.5)
    assert "ape" not in fit["held_out"] and "ape" not in fit["train"]      # the file stays JSON
    flat = diluted_profile(0.0, np.random.default_rng(0))
    fit = fit_kind(flat[flat.split == "train"], flat[flat.split != "train"], features + [TAPER_FEATURE],
                   optional=(SHARED,), earn=(TAPER_FEATURE,))
    assert "with" not in fit["variant"]
