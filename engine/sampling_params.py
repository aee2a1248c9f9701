"""Per-request sampling parameters."""
import math
from dataclasses import dataclass, replace

# Below this temperature sampling is argmax in all but name, and dividing logits by it
# overflows float32: such requests are greedy (vLLM's _SAMPLING_EPS).
GREEDY_EPS = 1e-5


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each output token, and when to stop.

    temperature: 0 = greedy (argmax); otherwise logits are divided by it before sampling.
    A temperature below 1e-5 is stored as 0 (greedy), as vLLM does. top_k: keep the k most
    likely tokens (-1 or 0 = all; stored as -1). top_p: keep the smallest set of tokens
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
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
        if t < GREEDY_EPS:
            object.__setattr__(self, "temperature", 0.0)
        if not (_is_int(self.top_k) and self.top_k >= -1):
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k!r}")
        if self.top_k == 0:
            object.__setattr__(self, "top_k", -1)
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if not (_is_int(self.max_tokens) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.seed is not None and not (_is_int(self.seed) and self.seed >= 0):
            raise ValueError(f"seed must be None or a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def for_vocab(self, vocab_size: int) -> "SamplingParams":
        """These parameters for a model with `vocab_size` tokens: a top_k at least the
        vocabulary keeps every token, so it becomes -1 (the sampler indexes the k-th
        largest logit and must never see k > vocab)."""
        return replace(self, top_k=-1) if self.top_k >= vocab_size else self
