"""Fused sampling: one read of the logits picks each row's token (greedy or temperature).

For temperature T > 0 a row's token is argmax_v(logits[v] / T - log E[v]) with E[v] ~ Exp(1)
independent: the exponential race (Gumbel-max trick), distributed as softmax(logits / T)
without computing a softmax. The noise is Philox, counter-based: E[v] is a pure function of
(the row's seed, the row's offset, v), so a row's draw does not depend on the batch around it
or on its position in it, and no generator state lives on the device.

Work is split over rows and over the vocabulary (grid (S, num_chunks)), so one row still
fills the GPU; each program writes its chunk's (best score, index) and a small torch reduction
picks each row's winner. One Philox call yields four 32-bit numbers, so the vocabulary is cut
in four quarters of Q = 16 * ceil(V / 64) (the last one shorter): counter i feeds v = i,
Q + i, 2Q + i, 3Q + i. That layout depends on V only, never on the launch's chunk size.
A second kernel picks each row's winner among its chunks: two launches, no torch op, so the
whole sampler fits in a CUDA graph at the cost of two kernel nodes.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from engine.kernels import pdl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _sample_chunks_kernel(logits_ptr, stride_row, temps_ptr, seeds_ptr, offsets_ptr,
                          part_score_ptr, part_index_ptr, V, Q, num_chunks,
                          BLOCK: tl.constexpr, N_ROUNDS: tl.constexpr, FAST_LOG: tl.constexpr,
                          PDL: tl.constexpr = False):
    pdl.enter(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    i = chunk * BLOCK + tl.arange(0, BLOCK)     # Philox counter: position within a quarter
    valid = i < Q
    t = tl.load(temps_ptr + row)
    zero = tl.zeros([BLOCK], tl.uint32)
    r0, r1, r2, r3 = zero, zero, zero, zero
    if t != 0:                                  # greedy rows skip the noise
        seed = tl.load(seeds_ptr + row)
        offset = tl.load(offsets_ptr + row)
        # the 128-bit counter: (position, 0, offset low, offset high)
        r0, r1, r2, r3 = tl.philox(seed, i.to(tl.uint32), zero,
                                   zero + (offset & 0xFFFFFFFF).to(tl.uint32),
                                   zero + (offset >> 32).to(tl.uint32), N_ROUNDS)
    noise = (r0, r1, r2, r3)
    # Best per lane over the four quarters, elementwise; one reduction at the end. A later
    # quarter only wins a lane on a strictly higher score, so each lane keeps its lowest
    # index; a lane of -inf keeps its first element, i. So the chunk's index is always a valid
    # one, also when every score is -inf.
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    index = tl.where(valid, i, V)
    for q in tl.static_range(4):
        v = i + q * Q
        x = tl.load(row_ptr + v, mask=valid & (v < V), other=float("-inf")).to(tl.float32)
        if t != 0:
            # log2 units: argmax of x/T - ln E equals argmax of x*log2(e)/T - log2(-log2 U).
            # U: the midpoints of 2**23 equal bins of (0, 1), never 0 or 1, exact in float32.
            u = ((noise[q] >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
            if FAST_LOG:    # one MUFU op each; the exact log2 would make the kernel ALU-bound
                g = libdevice.fast_log2f(-libdevice.fast_log2f(u))
            else:           # the interpreter has no fast_log2f
                g = tl.log2(-tl.log2(u))
            x = x * (LOG2E / t) - g
        take = x > best
        best = tl.where(take, x, best)
        index = tl.where(take, v, index)
    top = tl.max(best, axis=0)
    tl.store(part_score_ptr + row * num_chunks + chunk, top)
    index = tl.min(tl.where(best == top, index, V), axis=0)
    tl.store(part_index_ptr + row * num_chunks + chunk, index.to(tl.int64))


@triton.jit
def _pick_winner_kernel(part_score_ptr, part_index_ptr, out_ptr, num_chunks,
                        BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """out[row] = the index of the row's best chunk score (the lowest index on a tie)."""
    pdl.enter(PDL)
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    valid = c < num_chunks
    score = tl.load(part_score_ptr + row * num_chunks + c, mask=valid, other=float("-inf"))
    index = tl.load(part_index_ptr + row * num_chunks + c, mask=valid, other=2**62)
    top = tl.max(score, axis=0)
    # every chunk's index is valid (see above), so a row of -inf still picks a valid token
    tl.store(out_ptr + row, tl.min(tl.where(valid & (score == top), index, 2**62), axis=0))


def sample_from_logits(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                       offsets: torch.Tensor, block_size: int | None = None,
                       n_rounds: int = 10, out: torch.Tensor | None = None) -> torch.Tensor:
    """One token id per row of `logits` [S, V] (bf16/fp16/fp32, last dim contiguous).

    temperatures: float32 [S]; 0 = greedy: argmax(logits[r]), ties to the lowest index like
    torch.argmax. Otherwise a draw from softmax(logits[r] / T[r]) by the exponential race,
    with ties (of the noisy scores) to the lowest index. seeds, offsets: int64 [S]; row r's
    noise is a pure function of (seeds[r], offsets[r], v) (Philox with `n_rounds` rounds), so
    equal (seed, offset) give equal noise whatever the batch; greedy rows ignore both. Give
    rows that must differ different (seed, offset) pairs, and change them every step.
    Seeds are 64-bit (pass values >= 2**63 as their two's complement).

    Returns int64 [S], always in [0, V) (written into `out`, contiguous int64 [S], if given).
    `block_size` (positions per program and quarter, a power of two) changes the launch
    only, never the result. No host sync, no torch op but two allocations: safe to capture
    in a CUDA graph.

    On CUDA the two logs of the noise use the fast hardware log2 (absolute error ~2**-22);
    the interpreter uses tl.log2. Both, like torch's exponential_, see U on a grid near 1
    (here 2**-24), so tokens far below 1e-7 probability are drawn less often than they should.
    """
    S, V = logits.shape
    if logits.stride(1) != 1:
        raise ValueError(f"sample_from_logits: logits must be contiguous in the vocab, "
                         f"strides {logits.stride()}")
    for name, t, dtype in (("temperatures", temperatures, torch.float32),
                           ("seeds", seeds, torch.int64), ("offsets", offsets, torch.int64)):
        if t.shape != (S,) or t.dtype != dtype or not t.is_contiguous():
            raise ValueError(f"sample_from_logits: {name} must be contiguous {dtype} of shape "
                             f"({S},), got {t.dtype} {tuple(t.shape)}")
    if out is None:
        out = torch.empty(S, dtype=torch.int64, device=logits.device)
    elif out.shape != (S,) or out.dtype != torch.int64 or not out.is_contiguous():
        raise ValueError(f"sample_from_logits: out must be contiguous int64 of shape ({S},), "
                         f"got {out.dtype} {tuple(out.shape)}")
    if S == 0:
        return out
    Q = triton.cdiv(V, 64) * 16     # >= V / 4, and a multiple of 16 keeps the loads vectorised
    # few rows: small chunks, so that one row is still spread over many SMs
    block = block_size or (256 if S < 16 else 1024)
    num_chunks = triton.cdiv(Q, block)
    part_score = torch.empty(S, num_chunks, dtype=torch.float32, device=logits.device)
    part_index = torch.empty(S, num_chunks, dtype=torch.int64, device=logits.device)
    _sample_chunks_kernel[(S, num_chunks)](
        logits, logits.stride(0), temperatures, seeds, offsets, part_score, part_index,
        V, Q, num_chunks, BLOCK=block, N_ROUNDS=n_rounds,
        FAST_LOG=logits.is_cuda and torch.version.hip is None, num_warps=4,
        PDL=pdl.enabled(), **pdl.launch_kwargs())
    _pick_winner_kernel[(S,)](part_score, part_index, out, num_chunks,
                              BLOCK=triton.next_power_of_2(num_chunks), num_warps=1,
                              PDL=pdl.enabled(), **pdl.launch_kwargs())
    return out
