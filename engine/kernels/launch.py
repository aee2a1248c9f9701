"""The paged-attention kernels' launch geometry, as host rules without Triton: the step
packer (engine.step_inputs) sizes tile lists and split counts with them on any machine,
and engine.kernels.paged_attention launches with them.

Launch constants (no autotuning: graph capture must not benchmark). Chosen from offline sm_90
compiles (bf16, head_dim 128: decode 92 registers and 39 KB shared memory, so ~5 programs per
SM, each with the next K/V tile in flight; prefill on wgmma, no spills), not yet from timings:
`benchmarks/bench_attention.py --sweep` times the alternatives on a GPU.
"""
from dataclasses import dataclass

import numpy as np
import torch

# The split-KV plan's rule and constants live with the policy (torch-free), so the simulator
# costs a step by the plan the kernel runs: policy.decode_plan.
from policy.decode_plan import (DECODE_BLOCK_N, MAX_SPLITS, MIN_TOKENS_PER_SPLIT,  # noqa: F401
                                PROGRAMS_PER_SM, SPLIT_SLACK, DecodePlan, cdiv)

DECODE_NUM_WARPS = 4
DECODE_NUM_STAGES = 3


@dataclass(frozen=True)
class PrefillLaunch:
    """Launch geometry of the prefill kernel. block_m: query rows per program (tokens x the
    padded query group of one KV head; fp32 halves it); block_n: keys per step of the inner
    loop (fp32 halves it); num_stages: depth of the cp.async pipeline of the K/V loads.

    The default is chosen from offline sm_90 compiles (bf16, head_dim 128, Triton 3.9):
    every candidate of `bench_attention.py --stages prefill` runs both dots on wgmma without
    spills, but Triton waits for q.k^T right after issuing it, so one program never overlaps
    its softmax with its own matmuls; a second program on the SM can. M64 N64 w4 (185
    registers, 81 KB shared) fits two programs per SM where M128 N64 w8 (175 registers x 256
    threads) fits one. (Walking a tile list costs registers: M64 N64 w4 then takes 224 and
    still fits two; M128 N32 w8, 128 on the grid, takes 161 and fits one.)

    programs_per_sm: programs per SM of the grid that walks a tile list. At least as many as
    an SM holds at once (two for the default), so no SM idles while tiles are left; more let
    the hardware's scheduler even out uneven programs; each costs one read of the padding."""
    block_m: int = 64
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 4

    def __post_init__(self):
        for name in ("block_m", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"PrefillLaunch.{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.num_stages < 1 or self.programs_per_sm < 1:
            raise ValueError(f"PrefillLaunch: num_warps must be 1..16 (a power of two), num_stages and "
                             f"programs_per_sm >= 1, got {self.num_warps}, {self.num_stages}, "
                             f"{self.programs_per_sm}")


PREFILL_LAUNCH = PrefillLaunch()   # the engine's; bench_attention.py --stages prefill times the others


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 0 else 1


def choose_num_splits(batch_size: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """Split-KV factor for decode: 1 when (sequence, KV head) programs already fill the GPU,
    otherwise enough splits for about PROGRAMS_PER_SM programs per SM, keeping at least
    MIN_TOKENS_PER_SPLIT tokens per split and at most MAX_SPLITS splits."""
    programs = batch_size * num_kv_heads
    target = PROGRAMS_PER_SM * num_sms
    if programs >= target:
        return 1
    by_length = cdiv(max(max_context_len, 1), MIN_TOKENS_PER_SPLIT)
    return max(1, min(cdiv(target, programs), by_length, MAX_SPLITS))


def decode_work_capacity(num_rows: int, plan: DecodePlan) -> int:
    """Most work items `plan_decode_work` can produce for `num_rows` decode sequences under
    `plan`: what a CUDA graph of that many decode rows sizes its work list (and grid) for."""
    return num_rows + plan.target


def check_kernel_rule(plan: DecodePlan) -> DecodePlan:
    """`plan`, if the decode kernel can run its rule: tiles of DECODE_BLOCK_N tokens (a
    compile-time constant of the kernel) and at most MAX_SPLITS shares a sequence (the merge
    kernel's width). Else ValueError in one line."""
    if plan.block_n != DECODE_BLOCK_N or plan.max_splits > MAX_SPLITS:
        raise ValueError(f"decode plan: the kernel runs tiles of {DECODE_BLOCK_N} tokens and at most "
                         f"{MAX_SPLITS} shares a sequence; the rule asks for block_n {plan.block_n}, "
                         f"max_splits {plan.max_splits}")
    return plan


def plan_decode_work(context_lens: np.ndarray, plan: DecodePlan, items: np.ndarray, index: np.ndarray) -> int:
    """Balanced split-KV plan for the decode kernel (flash-decoding with a host work list).

    Every decode sequence b (rows 0..len(context_lens)-1) is cut into `plan`'s shares
    (policy.decode_plan.DecodePlan.shares: whole decode tiles, as even as tiles allow, about
    programs_per_sm programs per SM, a share up to split_slack x the chunk), one work item
    each: items[i] = (b, start, end, shares of b), index[b] = (first item, shares). So one long
    context among short ones no longer sets the step time (each sequence got the same split
    count before): every program reads about the same number of KV bytes. At most
    `decode_work_capacity(len, plan)` items; the rest of `items` gets b = -1. Returns the
    number of items."""
    n = len(context_lens)
    if n == 0:
        items[:, 0] = -1
        return 0
    ctx, tiles, per, shares = plan.shares(context_lens)
    count = int(shares.sum())
    first = np.cumsum(shares) - shares
    seq = np.repeat(np.arange(n), shares)
    k = np.arange(count) - first[seq]
    size = per[seq] * DECODE_BLOCK_N
    items[:count, 0] = seq
    items[:count, 1] = k * size
    items[:count, 2] = np.minimum((k + 1) * size, ctx[seq])
    items[:count, 3] = shares[seq]
    items[count:, 0] = -1
    index[:n, 0] = first
    index[:n, 1] = shares
    return count


def prefill_tile_tokens(num_heads: int, num_kv_heads: int, dtype: torch.dtype, max_query_len: int | None = None,
                        launch: PrefillLaunch = PREFILL_LAUNCH) -> int:
    """Query tokens per prefill program (BLOCK_Q). Two tile heights, so steps with new query
    lengths never compile new variants: short queries (small chunks) get tl.dot's 16 rows,
    others the full tile. A tile list (`tiles=`) always uses the full tile (None here)."""
    group_pad = next_power_of_2(num_heads // num_kv_heads)
    short_q = cdiv(16, group_pad)
    if max_query_len is not None and max_query_len <= short_q:
        return short_q
    block_q = max(launch.block_m // group_pad, short_q)
    if dtype == torch.float32:
        block_q = max(block_q // 2, short_q)  # fp32 tiles take twice the SRAM
    return block_q


def prefill_tile_programs(num_tiles: int, num_kv_heads: int, num_sms: int,
                          launch: PrefillLaunch = PREFILL_LAUNCH) -> int:
    """Programs per KV head that walk a prefill tile list of `num_tiles` entries: one per
    entry up to what the GPU holds at once (launch.programs_per_sm x num_sms over the KV
    heads). A CUDA graph's list is padded far past its real tiles; capped, the padding costs
    one read per program instead of a wave of programs per SM. Shape-only: graph-safe."""
    return max(1, min(num_tiles, cdiv(launch.programs_per_sm * num_sms, num_kv_heads)))
