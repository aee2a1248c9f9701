"""One request as the policy sees it: token ids, progress, KV blocks and timestamps."""
from array import array
from enum import Enum

# A sampled token the host has not received yet (asynchronous scheduling): `Scheduler.update`
# appends it, `Scheduler.receive` replaces it. Never a real token id.
PLACEHOLDER = -1


class SequenceStatus(Enum):
    WAITING = "waiting"      # queued, or preempted and waiting to be recomputed
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request's state. `token_ids` holds prompt then output tokens, as an int64
    `array("q")` (block hashing reads it as a buffer, with no Python int per token);
    `num_computed_tokens` counts tokens whose KV is in the cache (a preemption resets it to
    0: recompute). Times are whatever clock the executor passes in (seconds).

    finish_reason: "length" (max_tokens reached), "stop" (eos sampled and
    not ignore_eos) or "abort".
    """
    __slots__ = ("seq_id", "token_ids", "num_prompt_tokens", "num_tokens", "max_tokens", "max_num_tokens",
                 "ignore_eos", "eos_token_ids", "extra_keys", "status", "finish_reason",
                 "num_computed_tokens", "num_cached_tokens", "block_table", "block_hashes",
                 "num_registered_blocks", "arrival_time", "first_scheduled_time",
                 "token_times", "finish_time", "num_preemptions")

    def __init__(self, seq_id, prompt_token_ids, max_tokens, arrival_time=0.0,
                 ignore_eos=False, eos_token_id=None, extra_keys=b""):
        self.seq_id = seq_id
        # From an array("q") or bytes this is one memcpy; from a list, one C pass.
        self.token_ids = array("q", prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)
        self.num_tokens = self.num_prompt_tokens
        self.max_tokens = max_tokens
        self.max_num_tokens = self.num_prompt_tokens + max_tokens   # finishes on reaching it
        self.ignore_eos = ignore_eos
        # One id, several (Llama 3 instruct stops on three) or None.
        self.eos_token_ids = frozenset(() if eos_token_id is None else
                                       (eos_token_id,) if isinstance(eos_token_id, int) else eos_token_id)
        self.extra_keys = extra_keys      # bytes mixed into every block hash (LoRA, salt...)
        self.status = SequenceStatus.WAITING
        self.finish_reason = None
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0        # prompt tokens served by the prefix cache
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash of each full block of token_ids, lazily
        self.num_registered_blocks = 0    # leading blocks already in the prefix cache
        self.arrival_time = arrival_time
        self.first_scheduled_time = None
        self.token_times: list[float] = []  # time each output token was produced
        self.finish_time = None
        self.num_preemptions = 0

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens].tolist()

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:].tolist()

    @property
    def first_token_time(self):
        return self.token_times[0] if self.token_times else None

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self):
        return (f"Sequence({self.seq_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}/{self.max_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")
