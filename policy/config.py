"""Policy configuration: frozen dataclasses, validated at construction.

The KV pool size (number of blocks) is not configuration: the engine derives it from GPU
memory and the simulator from the hardware spec, and both pass it to `Scheduler`.
"""
from dataclasses import dataclass

POLICIES = ("chunked", "prefill_first")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class CacheConfig:
    """Paged KV cache: `block_size` tokens per block; `enable_prefix_caching` turns the
    xxhash prefix cache on."""
    block_size: int = 16
    enable_prefix_caching: bool = True

    def __post_init__(self):
        _require(isinstance(self.block_size, int) and self.block_size >= 1,
                 f"cache.block_size must be a positive integer, got {self.block_size!r}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Continuous batching limits and policy.

    policy: "chunked" (vLLM V1 / Sarathi: one token budget, running first, mixed prefill
        and decode, prompts chunked to fit) or "prefill_first" (nano-vLLM / vLLM V0: a
        prefill-only step whenever a waiting prompt fits, otherwise one decode step).
    max_num_seqs: most sequences running at once.
    max_num_batched_tokens: token budget of one step.
    max_model_len: longest sequence (prompt + output) a request may reach.
    long_prefill_token_threshold: with "chunked", the most tokens one prefill may take in a
        step (0 = no cap), so long prompts leave room for others.
    """
    policy: str = "chunked"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    long_prefill_token_threshold: int = 0

    def __post_init__(self):
        _require(self.policy in POLICIES,
                 f"scheduler.policy must be one of {POLICIES}, got {self.policy!r}")
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1,
                     f"scheduler.{name} must be a positive integer, got {value!r}")
        _require(self.long_prefill_token_threshold >= 0,
                 "scheduler.long_prefill_token_threshold must be >= 0 (0 = no cap), "
                 f"got {self.long_prefill_token_threshold}")
        _require(self.max_num_batched_tokens >= self.max_num_seqs,
                 f"scheduler.max_num_batched_tokens ({self.max_num_batched_tokens}) must be "
                 f">= scheduler.max_num_seqs ({self.max_num_seqs}): every running sequence "
                 "needs at least one token of the step's budget")

    def validate_with(self, cache: CacheConfig) -> None:
        """Checks that need both configs (called by `Scheduler`)."""
        _require(self.max_num_batched_tokens >= cache.block_size,
                 f"scheduler.max_num_batched_tokens ({self.max_num_batched_tokens}) is smaller "
                 f"than one KV block (cache.block_size={cache.block_size})")
