"""Vocabulary-parallel token embedding and LM head.

Rank r holds vocabulary rows [r*V/tp, (r+1)*V/tp). The embedding looks up the ids that
fall in its range, zeroes the rest and all-reduces, so every rank ends with the full
embedding. The LM head computes its slice of the logits and all-gathers them, so EVERY rank
gets the full [S, vocab] logits (the runtime calls `compute_logits` on all ranks and may
sample on any of them).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import copy_weight, dense_linear, shard_of


class VocabParallelEmbedding(nn.Module):

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if vocab_size % tp_size:
            raise ValueError(f"vocab_size ({vocab_size}) not divisible by tp_size ({tp_size})")
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.vocab_size = vocab_size
        self.shard_size = vocab_size // tp_size
        self.vocab_start = tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        copy_weight(param, shard_of(loaded, 0, self.vocab_size, self.vocab_start, self.shard_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local * mine, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelEmbedding):
    """logits = hidden @ W^T over the whole vocabulary, gathered on every rank (the matmul:
    engine.layers.linear.dense_linear, following the `skinny` plan)."""
    skinny = ()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = dense_linear(hidden, self.weight, None, self.skinny)
        if self.tp_size == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
        dist.all_gather(parts, logits)
        return torch.cat(parts, dim=-1)
