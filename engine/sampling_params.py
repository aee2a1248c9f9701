"""Per-request sampling parameters."""
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each output token, and when to stop.

    temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (-1 = all). top_p: keep the smallest set of tokens
    whose probability mass reaches top_p (1.0 = all). seed: makes this request's samples
    reproducible whatever else is in the batch (None = the engine's random stream).
    max_tokens: most output tokens. ignore_eos: keep generating after the EOS token (used to
    replay traces with fixed output lengths).
    """
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1)):
            raise ValueError(f"top_k must be -1 (off) or a positive integer, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed must be None or a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
