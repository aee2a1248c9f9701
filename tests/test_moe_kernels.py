"""The fused-MoE Triton kernels (interpreted on the CPU) against their torch references:
routing + alignment against engine.layers.moe.route and align_by_expert, the grouped GEMMs
and the slot sum against moe_reference, and the load-time choice of tiles."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

fm = pytest.importorskip("engine.kernels.fused_moe")
from engine.layers.moe import FusedMoE, moe_reference, route  # noqa: E402

SHAPES = [(8, 1), (8, 2), (8, 8), (64, 2), (64, 8), (128, 1), (128, 8)]   # (experts, top_k)


def lower_index_ties(logits, top_k, renormalize):
    """route's rule with ties broken by the lower expert index (route_align's contract)."""
    probs = torch.softmax(logits.float(), -1)
    ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :top_k]
    weights = probs.gather(1, ids)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, ids


@pytest.mark.parametrize("num_tokens", [1, 45, 300])
@pytest.mark.parametrize("num_experts,top_k", SHAPES)
def test_route_align_matches_torch(num_tokens, num_experts, top_k):
    """Distinct logits: ids exactly route's, weights to fp32 rounding. Logits with many
    exact ties (values in {0, 0.5, 1}): ids by the lower-index rule. Either way the pairs
    and block experts are exactly align_by_expert's, and their sizes depend on T, k, E only."""
    g = torch.Generator().manual_seed(num_tokens * 1000 + num_experts + top_k)
    renormalize = top_k % 2 == 0   # both rules across the grid
    block_m = 16 if num_tokens < 300 else 64
    distinct = torch.randn(num_tokens, num_experts, generator=g)
    tied = torch.randint(0, 3, (num_tokens, num_experts), generator=g).float() / 2
    for logits, reference in ((distinct, route), (tied.to(torch.bfloat16), lower_index_ties)):
        weights, ids, pairs, block_expert = fm.route_align(logits, top_k, renormalize, block_m)
        ref_weights, ref_ids = reference(logits, top_k, renormalize)
        assert torch.equal(ids.long(), ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=2e-6, atol=1e-7)
        ref_pairs, ref_blocks = fm.align_by_expert(ref_ids, num_experts, block_m)
        assert torch.equal(pairs, ref_pairs) and torch.equal(block_expert, ref_blocks)
        assert block_expert.numel() == fm.max_row_blocks(num_tokens * top_k, num_experts, block_m)
    if num_tokens > 1 and top_k < num_experts:   # ties do occur: the second case means something
        assert (tied.sort(-1, descending=True).values[:, top_k - 1:top_k + 1].diff(dim=-1) == 0).any()


@pytest.mark.parametrize("num_tokens,num_experts,top_k,block_m", [
    (2100, 8, 2, 16),     # three routing tiles (the two-launch path) at 8 experts
    (33, 4, 3, 32),       # k not a power of two, duplicate experts within a token
    (1, 128, 8, 64),
])
def test_align_matches_align_by_expert(num_tokens, num_experts, top_k, block_m):
    """Given ids (duplicates in a token allowed): align == align_by_expert exactly, in the
    stable order (pair index within an expert)."""
    ids = torch.randint(0, num_experts, (num_tokens, top_k),
                        generator=torch.Generator().manual_seed(num_tokens))
    pairs, blocks = fm.align(ids, num_experts, block_m)
    ref_pairs, ref_blocks = fm.align_by_expert(ids, num_experts, block_m)
    assert torch.equal(pairs, ref_pairs) and torch.equal(blocks, ref_blocks)


def test_route_align_stays_in_range_on_nan_and_rejects_bad_k():
    logits = torch.randn(3, 16)
    logits[1] = float("nan")
    _, ids, pairs, _ = fm.route_align(logits, 4, True)
    assert ids.min() >= 0 and ids.max() < 16
    with pytest.raises(ValueError, match="top_k must be in 1..16"):
        fm.route_align(logits, 17, True)


def random_moe(num_tokens, num_experts, top_k, hidden, inter, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=g).to(dtype)
    w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / 5).to(dtype)
    w2 = (torch.randn(num_experts, hidden, inter, generator=g) / 5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, generator=g)
    return x, w13, w2, logits


def assert_moe_close(out, x, w13, w2, weights, ids):
    assert out.dtype == x.dtype and out.shape == x.shape
    if x.dtype == torch.float32:
        torch.testing.assert_close(out, moe_reference(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)
    else:   # against the exact (fp32) result of the same bf16 inputs: bf16 roundings, at
        # most 2x those of the torch reference in bf16
        exact = moe_reference(x.float(), w13.float(), w2.float(), weights, ids)
        rel = lambda y: ((y.float() - exact).norm() / exact.norm()).item()  # noqa: E731
        assert rel(out) < 2 * rel(moe_reference(x, w13, w2, weights, ids)) < 2e-2


T16, T32 = fm.Tiles(32, 32), fm.Tiles(16, 64, 4, 4)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,hidden,inter,dtype,tiles", [
    (1, 8, 2, 32, 48, torch.float32, None),           # decode: one token, most experts idle
    (37, 16, 4, 40, 24, torch.float32, fm.MoeTiles(16, T16, T32)),   # ragged dims
    (5, 4, 4, 64, 64, torch.float32, fm.MoeTiles(32, T32, T16)),     # top_k == num_experts
    (19, 8, 2, 32, 32, torch.bfloat16, fm.MoeTiles(16, T16, T16)),
    (130, 4, 2, 32, 32, torch.float32, None),         # 65 pairs per expert: 64-row blocks
])
def test_fused_moe_matches_reference(num_tokens, num_experts, top_k, hidden, inter, dtype, tiles):
    """Routing given (fused_moe) and routing in the kernel (fused_experts), both against
    moe_reference of route's routing, at default and other tiles."""
    x, w13, w2, logits = random_moe(num_tokens, num_experts, top_k, hidden, inter, dtype,
                                    num_tokens)
    weights, ids = route(logits, top_k, True)
    assert_moe_close(fm.fused_moe(x, w13, w2, weights, ids, tiles), x, w13, w2, weights, ids)
    plan = ((num_tokens, tiles),) if tiles else None
    out = fm.fused_experts(x, logits, w13, w2, top_k, True, plan)
    assert_moe_close(out, x, w13, w2, weights, ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_slots_is_torchs_fp32_sum(dtype):
    y = torch.randn(7 * 3, 1500, generator=torch.Generator().manual_seed(1)).to(dtype)
    torch.testing.assert_close(fm.sum_slots(y, 7, 3), y.view(7, 3, -1).float().sum(1).to(dtype),
                               rtol=1e-6 if dtype == torch.float32 else 0, atol=1e-6)


def test_tiles_for_takes_the_nearest_bucket():
    a, b, c = fm.MoeTiles(16), fm.MoeTiles(32), fm.MoeTiles(64)
    plan = ((1, a), (64, b), (1024, c))
    assert [fm.tiles_for(plan, t, 8 * t, 128) for t in (1, 7, 8, 9, 63, 200, 300, 5000)] == \
        [a, a, a, b, b, b, c, c]
    assert fm.tiles_for((), 300, 2400, 128) == fm.default_tiles(2400, 128)
    assert fm.default_tiles(64 * 8, 8).block_m == fm.BLOCK_M_LARGE
    assert fm.bucket_sizes(3000) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 3000]
    assert fm.bucket_sizes(1) == [1]


def test_choose_moe_tiles_keeps_the_fastest(monkeypatch):
    """The timer charges each launch by its tiles: gate_up is cheapest at 32x128 tiles, down
    at 128x64, and 32-row blocks are cheaper wherever they are a candidate. The plan takes
    those per bucket, every layer of the shape gets it, and the model's forward follows it
    (right results at the chosen tiles)."""
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(FusedMoE(32, 48, 8, 2, True) for _ in range(5))
    for layer in layers:
        for p in layer.parameters():
            torch.nn.init.normal_(p, std=0.2)
        layer.fused = True
    layers.to(torch.bfloat16)
    assert fm.choose_moe_tiles(layers, 64, device_type="cuda") == []   # none on a GPU here
    calls = []

    def gate_up(x, w13, pairs, blocks, top_k, block_m, tiles):
        calls.append(("gate_up", block_m, tiles))

    def down(h, w2, weights, pairs, blocks, block_m, tiles):
        calls.append(("down", block_m, tiles))

    def cost(kind, block_m, tiles):
        best = fm.Tiles(32, 128, 4, 4) if kind == "gate_up" else fm.Tiles(128, 64, 4, 3)
        return (1 if tiles == best else 2) * (1 if block_m == 32 else 1.5)

    def time_us(fn):
        calls.clear()
        fn()
        assert len(calls) == fm.TUNED_LAYERS
        return sum(cost(*c) for c in calls)

    monkeypatch.setattr(fm, "gate_up", gate_up)
    monkeypatch.setattr(fm, "down", down)
    report = fm.choose_moe_tiles(layers, 64, device_type="cpu", time_us=time_us)
    monkeypatch.undo()
    assert [r["tokens"] for r in report] == fm.bucket_sizes(64)
    for (tokens, tiles), row in zip(layers[0].moe_tiles, report):
        has_32 = 32 in [m for m, _ in fm.tile_candidates(tokens * 2, 8)]
        assert tiles.block_m == (32 if has_32 else fm.default_tiles(tokens * 2, 8).block_m)
        small = tiles.block_m <= 32
        assert tiles.gate_up == (fm.Tiles(32, 128, 4, 4) if small else fm.Tiles())
        assert tiles.down == (fm.Tiles(128, 64, 4, 3) if small else fm.Tiles())
        assert row["chosen_us"] <= row["default_us"]
    assert all(layer.moe_tiles == layers[0].moe_tiles for layer in layers)
    x = torch.randn(20, 32).to(torch.bfloat16)
    layer = layers[3]
    weights, ids = route(layer.gate(x), 2, True)
    assert_moe_close(layer(x), x, layer.w13, layer.w2, weights, ids)
