"""The prefill attention's span (prefill_span_tokens): a chunk's few query tiles behind a long
prefix take one tile's walk over it, many tiles take their total work; the fitted mixed kind
prices it at a pairs-per-key the profile's held-out shapes choose, keeps it only where it pays,
and the grid profiles chunks behind cached context beside serving's decodes."""
import json

import numpy as np
import pandas as pd
import pytest

from simulator import CudaGraphs
from simulator.calibrate import (PREFILL_SPAN_PAIRS, fit_kinds, fit_prefill_span, with_causal_pairs,
                                 with_prefill_max)
from simulator.profile_grid import profile_grid, shape_batch
from simulator.cost_model import (CACHED_PAIRS_FEATURE, CALIBRATION_FORMAT, PREFILL_SPAN_FEATURE,
                                  FittedCostModel, prefill_causal_pairs, prefill_cached_pairs,
                                  prefill_span_tokens)


def features(shape):
    return shape_batch(shape, 16, 1 << 16).features()


def test_cached_pairs_are_the_pairs_behind_each_chunks_prefix():
    f = features([(4096 + 100, 100), (300 + 50, 50), (2048, 1)])
    assert prefill_cached_pairs(f) == 100 * 4096 + 50 * 300
    assert prefill_cached_pairs(f) + prefill_causal_pairs(f) == f["prefill_attention_pairs"]
    table = with_causal_pairs(pd.DataFrame([f]))
    assert table[CACHED_PAIRS_FEATURE].tolist() == [prefill_cached_pairs(f)]


def test_the_span_is_a_chunks_context_until_its_tiles_fill_the_gpu():
    d = 512
    few = [prefill_span_tokens(features([(4096 + n, n)]), d) for n in (16, 64, 256)]
    # a few tiles: the walk over the prefix, hardly more for more tokens
    assert few == [4096 + 16, 4096 + 64, 4096 + 256]
    many = [features([(4096 + n, n)]) for n in (2048, 4096)]
    # many: the pairs over D, growing with the chunk (twice the tokens, over twice the span)
    spans = [prefill_span_tokens(f, d) for f in many]
    assert spans == [f["prefill_attention_pairs"] / d for f in many]
    assert spans[1] > 2 * spans[0] > 2 * (4096 + 2048)
    # several chunks: the longest one's context, not the sum (their tiles run side by side)
    assert prefill_span_tokens(features([(2048 + 32, 32)] * 3), d) == 2048 + 32
    # ... the longest, not their mean: a short chunk behind a long prefix beside a fresh one
    # walks the whole prefix (on the H200 such real steps ran 13-21% over the mean's price)
    unequal = features([(3900 + 150, 150), (150, 150), (2048, 1)])
    assert unequal["prefill_max_context_tokens"] == 3900 + 150
    assert prefill_span_tokens(unequal, d) == 3900 + 150
    # a step recorded before the column was: the chunks' mean context
    recorded = {k: v for k, v in unequal.items() if k != "prefill_max_context_tokens"}
    assert prefill_span_tokens(recorded, d) == (3900 + 150 + 150) / 2
    # decodes only: no prefill attention
    assert prefill_span_tokens(features([(2048, 1)] * 4), d) == 0.0
    # a larger D (more of the GPU per key) keeps a chunk in the walk regime longer
    f = features([(4096 + 1024, 1024)])
    assert prefill_span_tokens(f, 256) > prefill_span_tokens(f, 2048) == 4096 + 1024


def calibration(coefficients, span=None):
    kind = {"knots": [2, 8192], "base_s": [1e-3, 1e-1], "coefficients": coefficients}
    return {"format": CALIBRATION_FORMAT, "kinds": {"mixed": kind},
            **({"prefill_span": span} if span is not None else {})}


def test_the_fitted_model_prices_the_span_at_the_files_pairs_per_key():
    f = features([(6144 + 200, 200), (3000, 1)])
    graphs = CudaGraphs(mixed=(256, 8192))
    without = FittedCostModel(calibration({"prefill_kv_tokens": 1e-7}), graphs=graphs)
    for d in (256, 1024):
        model = FittedCostModel(calibration({"prefill_kv_tokens": 1e-7, PREFILL_SPAN_FEATURE: 6e-7},
                                            {"pairs_per_key": d}), graphs=graphs)
        assert model.predict(f) - without.predict(f) == pytest.approx(6e-7 * prefill_span_tokens(f, d))
    with pytest.raises(ValueError, match="prefill_span.*pairs_per_key"):
        FittedCostModel(calibration({PREFILL_SPAN_FEATURE: 6e-7}))
    with pytest.raises(ValueError, match="pairs_per_key"):
        FittedCostModel(calibration({PREFILL_SPAN_FEATURE: 6e-7}, {"pairs_per_key": 0}))


def synthetic_profile(span_pairs, rng) -> pd.DataFrame:
    """Mixed shapes (one chunk of n tokens behind s cached, some beside decodes; two chunks),
    timed as a base per token + decode attention + prefill attention: span_pairs=D, the kernel's
    max(context, pairs / D) at 0.7 us per key; None, linear in pairs (1.1 ns) and kv tokens.
    0.3% noise; one cached context of each chunk size held out."""
    rows = []
    sizes = (16, 64, 128, 256, 512, 1024, 2048, 4096)
    for t in sizes:
        for k, s in enumerate((0, 512, 1024, 2048, 4096, 6144)):
            for beside in (0, 4):
                shape = [(s + t - beside, t - beside)] + [(2048, 1)] * beside
                f = features(shape)
                if span_pairs:
                    attn = 0.7e-6 * prefill_span_tokens(f, span_pairs)
                else:
                    attn = 1.1e-9 * f["prefill_attention_pairs"] + 0.5e-6 * f["prefill_kv_tokens"]
                time = 2e-3 + 20e-6 * t + 10e-9 * f["decode_context_tokens"] + attn
                rows.append({**f, "kind": "mixed", "rows": t, "device_s": time * (1 + 0.003 * rng.standard_normal()),
                             "split": "held_out" if k == 3 else "train"})
        f = features([(t // 2, t // 2), (t - t // 2, t - t // 2)])
        attn = 0.7e-6 * prefill_span_tokens(f, span_pairs) if span_pairs else 1.1e-9 * f["prefill_attention_pairs"]
        rows.append({**f, "kind": "mixed", "rows": t, "split": "train",
                     "device_s": (2e-3 + 20e-6 * t + attn) * (1 + 0.003 * rng.standard_normal())})
    return with_causal_pairs(pd.DataFrame(rows))


def test_the_fit_finds_the_kernels_pairs_per_key_and_keeps_the_span_only_where_it_pays():
    rng = np.random.default_rng(0)
    true_d = PREFILL_SPAN_PAIRS[2]
    p = synthetic_profile(true_d, rng)
    kinds, span = fit_prefill_span(p, fit_kinds(p, ["mixed"]))
    assert span["pairs_per_key"] == true_d
    assert span["errors"][str(true_d)] == min(span["errors"].values())
    mixed = kinds["mixed"]
    assert mixed["coefficients"][PREFILL_SPAN_FEATURE] == pytest.approx(0.7e-6, rel=0.1)
    assert mixed["held_out"]["mape"] < 0.01
    without = fit_kinds(p, ["mixed"])["mixed"]
    assert without["held_out"]["mape"] > 2 * mixed["held_out"]["mape"]
    # attention linear in pairs and kv tokens: the span is tried, not kept, nothing recorded
    flat = synthetic_profile(None, rng)
    before = fit_kinds(flat, ["mixed"])
    kinds, span = fit_prefill_span(flat, before)
    assert span == {} and kinds == before


def test_grid_profiles_chunks_behind_a_long_prefix_beside_serving_decodes_and_alone():
    S, M, L = 256, 8192, 8192
    graphs = CudaGraphs.for_engine(S, M, M)
    beside, two_alone = {}, set()
    for p in profile_grid(S, M, L, graphs):
        chunks = [e for e in p["shape"] if e[1] > 1]
        decodes = len(p["shape"]) - len(chunks)
        if len(chunks) == 1 and decodes and chunks[0][0] - chunks[0][1] >= 2048:
            beside.setdefault(decodes, set()).add(p["split"])
            assert sum(e[1] for e in p["shape"]) in graphs.mixed
        if len(chunks) == 2 and not decodes and min(c - n for c, n, *_ in chunks) >= 1024:
            two_alone.add(p["split"])
    assert set(beside) == {1, 8, 32}
    assert set().union(*beside.values()) == {"train", "held_out"}
    assert two_alone == {"train", "held_out"}


def test_a_profile_without_the_column_gets_it_from_its_shapes():
    shapes = [[(3900 + 150, 150), (150, 150), (2048, 1)], [(2048, 1)] * 4, [(512, 512)]]
    rows = [features(shape) for shape in shapes]
    recorded = pd.DataFrame(rows).drop(columns=["prefill_max_context_tokens"])
    recorded["shape"] = [json.dumps(shape) for shape in shapes]
    got = with_prefill_max(recorded)
    assert got["prefill_max_context_tokens"].tolist() == [r["prefill_max_context_tokens"] for r in rows]
    assert got["prefill_max_context_tokens"].tolist() == [3900 + 150, 0, 512]
    # without shapes it stays absent (the span then takes the mean)
    assert "prefill_max_context_tokens" not in with_prefill_max(recorded.drop(columns=["shape"])).columns
