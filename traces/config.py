"""What trace to replay: `TraceConfig`, the Hydra structured config of the `trace` group."""
from dataclasses import dataclass


class TraceError(ValueError):
    """A trace cannot be loaded: bad config, missing file or bad row. The message names the
    file, the 1-based line and the problem."""


# Shipped data files, resolved inside this package's folder unless `path` is given.
TRACE_FILES = {
    "sharegpt": "sharegpt_8k_filtered_stats_llama2_tokenizer.csv",
    "arxiv": "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
    "bwb": "bwb_stats_llama2_tokenizer_filtered_v2.csv",
    "azure_conv": "AzureLLMInferenceTrace_conv.csv",
    "azure_code": "AzureLLMInferenceTrace_code.csv",
    "mooncake_conv": "conversation_trace.jsonl",
    "mooncake_synthetic": "synthetic_trace.jsonl",
    "sharegpt_tokens": None,  # one file per tokenizer, below
}
SHAREGPT_TOKENS_FILES = {
    "qwen3": "sharegpt-qwen3-32b-300-sps10.jsonl",
    "llama": "sharegpt-llama-3.1-8b-300-sps10.jsonl",
}
SYNTHETIC_TRACES = ("synthetic", "shared_prefix", "multi_turn")
TRACE_NAMES = tuple(TRACE_FILES) + SYNTHETIC_TRACES
# Traces whose rows carry arrival times; the others default to a Poisson process.
TIMESTAMPED = ("azure_conv", "azure_code", "mooncake_conv", "mooncake_synthetic",
               "sharegpt_tokens")
# Longest prompt or output one request may have. Models serve at most a few million tokens of
# context; a longer length is a mistake, and materializing it would take the memory of
# billions of token ids before anything else could check it.
MAX_ROW_TOKENS = 10_000_000
ARRIVALS = ("trace", "poisson", "gamma", "constant", "burst")
LENGTH_DISTS = ("fixed", "uniform", "lognormal")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise TraceError(message)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class TraceConfig:
    """Which requests to replay and when they arrive.

    Source
      name: a shipped trace (sharegpt, arxiv, bwb, azure_conv, azure_code, mooncake_conv,
        mooncake_synthetic, sharegpt_tokens) or a generator (synthetic, shared_prefix,
        multi_turn). See traces/README.md for each.
      path: another file in the same format as `name` (default: the shipped file).
      tokenizer: sharegpt_tokens only: whose token ids, "qwen3" or "llama".

    Selection (filters first, then the first `num_requests` rows in file order)
      num_requests: at most this many requests; None = all (generators: 1000).
      min_/max_prompt_len, min_/max_output_len: keep rows inside these bounds (None = no bound).
      max_total_len: drop rows with prompt_len + output_len above it (fit a model's
        max_model_len).

    Arrivals
      arrival: "trace" (the file's timestamps, re-based so the first kept request is at 0),
        "poisson", "gamma" (gaps with coefficient of variation `cv`), "constant" (gaps of
        exactly 1/request_rate) or "burst" (everyone at t=0). None = "trace" for files with
        timestamps, else "poisson".
      request_rate: requests/s of the poisson, gamma and constant processes.
      cv: gamma only: std/mean of the gaps (1.0 is Poisson; larger is burstier).
      time_scale: "trace" only: multiplies the file's timestamps (0.5 replays twice as fast).
      seed: arrivals, synthetic lengths and synthetic content all derive from it.

    Generators (synthetic, shared_prefix, multi_turn)
      length_dist: "fixed" (exactly prompt_len/output_len), "uniform" (integers in
        prompt_len_range/output_len_range, both ends included) or "lognormal" (mean
        prompt_len/output_len, coefficient of variation `length_cv`, clipped to the ranges
        when given).
      num_prefixes, prefix_len: shared_prefix and multi_turn: each request (or conversation)
        starts with one of `num_prefixes` system prompts of `prefix_len` tokens; the sampled
        prompt length is what follows it. prefix_len=0: no system prompt.
      num_turns: multi_turn: turns per conversation. The prompt of turn k+1 is the prompt of
        turn k, then its output, then new user text of a sampled prompt length.
    """
    name: str = "sharegpt"
    path: str | None = None
    tokenizer: str = "qwen3"
    num_requests: int | None = None
    min_prompt_len: int = 1
    max_prompt_len: int | None = None
    min_output_len: int = 1
    max_output_len: int | None = None
    max_total_len: int | None = None
    arrival: str | None = None
    request_rate: float = 1.0
    cv: float = 1.0
    time_scale: float = 1.0
    seed: int = 0
    length_dist: str = "fixed"
    prompt_len: int = 512
    output_len: int = 128
    prompt_len_range: list[int] | None = None
    output_len_range: list[int] | None = None
    length_cv: float = 1.0
    num_prefixes: int = 8
    prefix_len: int = 512
    num_turns: int = 4

    def __post_init__(self):
        _require(self.name in TRACE_NAMES,
                 f"trace.name must be one of {TRACE_NAMES}, got {self.name!r}")
        _require(self.tokenizer in SHAREGPT_TOKENS_FILES,
                 f"trace.tokenizer must be one of {tuple(SHAREGPT_TOKENS_FILES)}, "
                 f"got {self.tokenizer!r}")
        _require(self.path is None or self.name not in SYNTHETIC_TRACES,
                 f"trace.path is for file traces; trace {self.name!r} is generated")
        _require(self.arrival is None or self.arrival in ARRIVALS,
                 f"trace.arrival must be one of {ARRIVALS} or None, got {self.arrival!r}")
        _require(self.arrival != "trace" or self.name in TIMESTAMPED,
                 f"trace.arrival='trace' needs timestamps, and trace {self.name!r} has none; "
                 f"the traces with timestamps are {TIMESTAMPED}")
        _require(self.length_dist in LENGTH_DISTS,
                 f"trace.length_dist must be one of {LENGTH_DISTS}, got {self.length_dist!r}")
        for name in ("num_requests", "max_prompt_len", "max_output_len", "max_total_len"):
            value = getattr(self, name)
            _require(value is None or (_is_int(value) and value >= 1),
                     f"trace.{name} must be a positive integer or None, got {value!r}")
        for name in ("min_prompt_len", "min_output_len", "prompt_len", "output_len",
                     "num_prefixes", "num_turns"):
            value = getattr(self, name)
            _require(_is_int(value) and value >= 1,
                     f"trace.{name} must be a positive integer, got {value!r}")
        _require(_is_int(self.prefix_len) and self.prefix_len >= 0,
                 f"trace.prefix_len must be an integer >= 0, got {self.prefix_len!r}")
        _require(_is_int(self.seed) and self.seed >= 0,
                 f"trace.seed must be an integer >= 0, got {self.seed!r}")
        for name in ("request_rate", "cv", "time_scale", "length_cv"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and not isinstance(value, bool)
                     and value > 0, f"trace.{name} must be a number > 0, got {value!r}")
        for name in ("prompt_len_range", "output_len_range"):
            value = getattr(self, name)
            _require(value is None or (len(value) == 2 and all(_is_int(v) for v in value)
                                       and 1 <= value[0] <= value[1]),
                     f"trace.{name} must be None or [low, high] with 1 <= low <= high, "
                     f"got {value!r}")
        if self.length_dist == "uniform":
            _require(self.prompt_len_range is not None and self.output_len_range is not None,
                     "trace.length_dist='uniform' needs trace.prompt_len_range and "
                     "trace.output_len_range ([low, high])")
        for kind in ("prompt", "output"):
            low, high = getattr(self, f"min_{kind}_len"), getattr(self, f"max_{kind}_len")
            _require(high is None or low <= high,
                     f"trace.min_{kind}_len ({low}) is above trace.max_{kind}_len ({high})")
        for name in ("prompt_len", "output_len", "prefix_len", "prompt_len_range",
                     "output_len_range"):
            value = getattr(self, name)
            longest = max(value) if isinstance(value, list) else (value or 0)
            _require(longest <= MAX_ROW_TOKENS,
                     f"trace.{name} must be at most {MAX_ROW_TOKENS:,} tokens, got {value!r}")

    @property
    def default_arrival(self) -> str:
        """The arrival process used when `arrival` is None."""
        return "trace" if self.name in TIMESTAMPED else "poisson"
