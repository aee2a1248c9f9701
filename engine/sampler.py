"""Token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

Sampling uses the exponential race: for probabilities p and independent noise
E ~ Exp(1), argmax(p / E) is distributed as Categorical(p). In log space that is
argmax(logits / T - log E): the softmax normaliser is the same for the whole row, so no
softmax pass is needed. No cumulative sums, no host syncs, and a request's seed only has to
fix its own row of noise.

Two implementations: torch ops with torch generators (the CPU, and any step with top-k or
top-p), and on CUDA (`Sampler(fused=True)`) one fused Triton kernel with Philox noise,
`engine.kernels.sample_from_logits`, for steps with temperature but no top-k/top-p
(eager all-greedy steps stay one argmax). They draw different random numbers for the same
seed: a seeded request reproduces its tokens on the same path, not across paths.

The fused path is what a CUDA graph captures (`sample_fused`, whatever the step's flags:
its greedy rows are torch.argmax's): it reads every per-step value, the rows' Philox seeds
and offsets included, from device tensors the engine packs into its step buffer, so a
replay draws fresh noise without any host work. A graph step with top-k/top-p samples again
on the torch path after the replay.
"""
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(slots=True)
class SamplingTensors:
    """One step's sampling inputs, one row per sampled sequence (device tensors), plus host
    flags that pick the fast path without a device sync.

    temperatures: float32 [S], 0 = greedy. top_k: int64 [S], vocab size = off.
    top_p: float32 [S], 1 = off. seeds: (row, seed) for the rows with their own seed, where
    seed already folds in the index of the token being sampled (`row_seed`).
    philox_seeds, philox_offsets: int64 [S], the fused kernel's noise per row (the engine
    packs them: `philox_inputs`); None: the Sampler derives them from its own step count.
    """
    temperatures: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    all_greedy: bool
    any_greedy: bool
    use_top_k: bool
    use_top_p: bool
    seeds: list[tuple[int, int]]
    philox_seeds: torch.Tensor | None = None
    philox_offsets: torch.Tensor | None = None


def row_seed(seed: int, index: int) -> int:
    """The seed of a request's `index`-th sampled token: splitmix64 of both, so every bit
    depends on both (CPU generators keep only the low 32 bits of a seed)."""
    mask = (1 << 64) - 1
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def philox_inputs(engine_seed: int, step: int, seeds: list[tuple[int, int]], out_seeds,
                  out_offsets) -> None:
    """The fused kernel's (seed, offset) per row, written into `out_seeds` / `out_offsets`
    (int64 numpy arrays of S rows): unseeded rows use the `step`-th seed of the
    engine-wide stream at offsets 1..S; seeded rows their own seed at offset 0, so their
    noise depends on neither their row nor their neighbours, and never coincides with an
    unseeded row's."""
    S = len(out_seeds)
    out_seeds[:] = as_int64(row_seed(engine_seed, step))
    out_offsets[:] = np.arange(1, S + 1)
    for row, seed in seeds:
        out_seeds[row], out_offsets[row] = as_int64(seed), 0


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p set to -inf (one sort for both)."""
    sorted_logits, order = logits.sort(dim=-1)              # ascending: most likely last
    vocab_size = logits.shape[-1]
    if top_k is not None:
        kth_largest = sorted_logits.gather(1, (vocab_size - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth_largest, float("-inf"))
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False                                   # always keep the most likely
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def as_int64(seed: int) -> int:
    """A 64-bit seed as the int64 with the same bits (what an int64 tensor can hold)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= 1 << 63 else seed


class Sampler:
    """Picks one token per row of logits. Unseeded rows draw from one engine-wide stream
    (seeded once at startup); seeded rows draw from their own seed, so they do not depend
    on what else is in the batch. `fused` (CUDA only) samples steps without top-k/top-p
    with the fused kernel."""

    def __init__(self, device: torch.device, seed: int = 0, fused: bool = False):
        self.generator = torch.Generator(device).manual_seed(seed)
        self.row_generator = torch.Generator(device)
        self.seed = seed
        self.fused = fused
        self.steps = 0      # fused steps so far: the engine-wide stream's position

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, params: SamplingTensors,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """logits [S, vocab] -> token ids int64 [S] (written into `out` if given)."""
        if params.all_greedy:
            return torch.argmax(logits, dim=-1, out=out)
        if self.fused and not (params.use_top_k or params.use_top_p):
            return self.sample_fused(logits, params, out)
        logits = logits.float()
        greedy_tokens = logits.argmax(dim=-1) if params.any_greedy else None
        temperatures = params.temperatures
        if params.any_greedy:    # greedy rows are overwritten below; avoid dividing by 0
            temperatures = torch.where(temperatures == 0, 1.0, temperatures)
        logits = logits / temperatures.unsqueeze(1)
        if params.use_top_k or params.use_top_p:
            logits = apply_top_k_top_p(logits, params.top_k if params.use_top_k else None,
                                       params.top_p if params.use_top_p else None)
        noise = torch.empty_like(logits).exponential_(generator=self.generator)
        for row, seed in params.seeds:
            noise[row].exponential_(generator=self.row_generator.manual_seed(seed))
        tokens = logits.sub_(noise.log_()).argmax(dim=-1)
        if params.any_greedy:
            tokens = torch.where(params.temperatures == 0, greedy_tokens, tokens)
        return tokens if out is None else out.copy_(tokens)

    def sample_fused(self, logits: torch.Tensor, params: SamplingTensors,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """The fused kernel over every row, greedy rows (temperature 0: the argmax, ties to
        the lowest index, as torch.argmax) included; top-k/top-p are ignored. With the
        step's packed `philox_seeds` / `philox_offsets` this is two kernel launches and no
        host work (what a CUDA graph captures); without them, this Sampler's step count
        picks the engine-wide stream's seed (`philox_inputs`)."""
        from engine.kernels import sample_from_logits   # Triton: imported on use
        seeds, offsets = params.philox_seeds, params.philox_offsets
        if seeds is None:
            self.steps += 1
            S = logits.shape[0]
            seeds, offsets = np.empty(S, dtype=np.int64), np.empty(S, dtype=np.int64)
            philox_inputs(self.seed, self.steps, params.seeds, seeds, offsets)
            seeds, offsets = torch.from_numpy(seeds), torch.from_numpy(offsets)
            if logits.device.type == "cuda":   # pinned: the copies do not wait for the GPU
                seeds, offsets = seeds.pin_memory(), offsets.pin_memory()
            seeds = seeds.to(logits.device, non_blocking=True)
            offsets = offsets.to(logits.device, non_blocking=True)
        return sample_from_logits(logits, params.temperatures, seeds, offsets, out=out)
