"""Several prompt chunks behind cached context in one step (prefill_other_cached_tokens: per chunk,
the cached context of the other chunks, averaged over the chunks): computed from a step's features alike
in the simulator and on a profile table, and fitted only where the shapes it prices say so."""
import numpy as np
import pandas as pd
import pytest

from simulator.calibrate import with_causal_pairs
from simulator.profile_grid import shape_batch
from simulator.cost_model import OTHER_CACHED_FEATURE, fit_kind, prefill_other_cached_tokens


def features(shape):
    return shape_batch(shape, 16, 1 << 14).features()


def test_each_chunk_counts_the_other_chunks_cached_context():
    decodes = [(1024, 1)] * 4
    assert prefill_other_cached_tokens(features(decodes)) == 0                       # no prompt
    assert prefill_other_cached_tokens(features([(2048, 1024)] + decodes)) == 0       # one chunk
    assert prefill_other_cached_tokens(features([(512, 512), (256, 256)])) == 0      # none cached
    two = features([(1024 + 300, 300), (512 + 200, 200)] + decodes)
    assert prefill_other_cached_tokens(two) == 1 * (1024 + 512) / 2
    three = features([(1024 + 300, 300), (512 + 200, 200), (100, 100)])
    assert prefill_other_cached_tokens(three) == 2 * (1024 + 512) / 3
    # linear in the number of chunks: k equal chunks behind s cached tokens each give (k - 1) s
    for k in (2, 4, 6):
        assert prefill_other_cached_tokens(features([(1000 + 100, 100)] * k)) == (k - 1) * 1000
    rows = [features(s) for s in ([(2048, 1024)], [(1024 + 300, 300), (512 + 200, 200)], decodes)]
    table = with_causal_pairs(pd.DataFrame(rows))
    assert table[OTHER_CACHED_FEATURE].tolist() == [prefill_other_cached_tokens(f) for f in rows]


def mixed_profile(extra_s: float, rng) -> pd.DataFrame:
    """Prompt steps of 1-3 chunks, behind 0-2k cached tokens, beside 8 decodes: fixed + per
    token + per cached pair, plus `extra_s` per token of the other chunks' cached context."""
    rows = []
    for i in range(300):
        chunks = int(rng.integers(1, 4))
        cached = int(rng.choice([0, 512, 1024, 2048])) if rng.random() < 0.6 else 0
        n = int(rng.choice([128, 256, 512, 1024]))
        f = features([(cached + n, n)] * chunks + [(1024, 1)] * 8)
        t = (1e-3 + 20e-9 * f["num_batched_tokens"] + 0.5e-9 * f["prefill_attention_pairs"]
             + extra_s * prefill_other_cached_tokens(f))
        rows.append({**f, "rows": f["num_batched_tokens"], "device_s": t * (1 + 0.003 * rng.standard_normal()),
                     "split": "held_out" if i % 3 == 1 else "train"})
    return with_causal_pairs(pd.DataFrame(rows))


@pytest.mark.parametrize("extra_s", [1e-7, 0.0])
def test_the_fit_keeps_the_term_only_where_the_shapes_it_prices_need_it(extra_s):
    p = mixed_profile(extra_s, np.random.default_rng(0))
    features_ = ["prefill_attention_pairs", OTHER_CACHED_FEATURE]
    fit = fit_kind(p[p.split == "train"], p[p.split != "train"], features_, earn=(OTHER_CACHED_FEATURE,))
    if extra_s:
        assert fit["variant"].endswith(f"with {OTHER_CACHED_FEATURE}")
        assert fit["coefficients"][OTHER_CACHED_FEATURE] == pytest.approx(extra_s, rel=0.2)
    else:
        assert OTHER_CACHED_FEATURE not in fit["coefficients"]
