"""What the HTTP server drives: a `Backend` runs requests through the policy layer, one
`step()` at a time, on the server's engine thread.

Backends: `EngineBackend` (the real engine, `engine.LLMEngine`), `server.sim.SimBackend`
(the policy with the simulator's cost model standing in for the GPU, paced in real time),
and `server.process.BackendProcess`, either of them in a process of its own (the server's
default). /metrics reads `Backend.stats()`.
"""
import gc
import math
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

from server.stalls import KernelCensus, StallLog


def sleep_until(deadline: float | None) -> float:
    """Sleep until time.perf_counter() reaches `deadline` (None or past: at once); returns
    how late it woke (seconds after the deadline, 0 if none). One absolute clock: a late
    wake-up shortens the next sleep instead of delaying every later deadline."""
    if deadline is None:
        return 0.0
    delay = deadline - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    return time.perf_counter() - deadline


def token_ids_in_vocab(prompt, vocab_size: int) -> list[int]:
    """A token-id prompt as ints; ValueError naming the first id outside [0, vocab_size)."""
    token_ids = [int(t) for t in prompt]
    bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    return token_ids


class BackendDead(RuntimeError):
    """The backend can serve no more requests (its engine process died, say)."""


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """A request's sampling and stopping fields, checked as the API promises them whatever
    the backend (the simulated one samples nothing; the engine checks again, in
    `engine.SamplingParams`). Raises ValueError naming the field."""
    max_tokens: int
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self):
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 1):
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not self.top_k >= -1:
            raise ValueError(f"top_k must be -1 or 0 (off) or a positive integer, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")


@dataclass(frozen=True, slots=True)
class Finished:
    """A request that left the backend. finish_reason: "stop", "length" or "error" (then
    `error` says why). Times are the backend's clock (time.perf_counter seconds)."""
    request_id: str
    token_ids: list[int]
    text: str | None
    finish_reason: str
    error: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    arrival_time: float
    first_scheduled_time: float | None
    token_times: tuple[float, ...]
    finish_time: float | None


class Backend(ABC):
    """Everything but `tokenize`, `chat_tokens` and `decode` (and `add` / `abort` where
    `concurrent_add`) is called on the engine thread only (the policy is never touched by
    two threads). Those may run on other threads at the same time: they must not touch the
    policy."""
    name: str               # the model (directory or conf name) the backend runs
    vocab_size: int
    max_model_len: int
    has_tokenizer: bool     # text prompts and decoded text available
    has_chat_template: bool
    max_token_bytes: int    # UTF-8 bytes of the longest token: bounds a prompt's length
    # add and abort may run on the event loop's thread while step() runs on the engine's
    # (else the server calls them on the engine thread, between steps)
    concurrent_add: bool = False
    # where set: a file descriptor that turns readable when step() has a result to return
    # at once (the step runs elsewhere, in a process of its own); the server then waits for
    # it on its event loop and calls step() there: no hop through the engine thread, whose
    # wake-up waits for the interpreter lock while the loop streams chunks
    step_fd: int | None = None

    @abstractmethod
    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a prompt; ValueError if it cannot be a prompt of this model."""

    @abstractmethod
    def chat_tokens(self, messages: list[dict]) -> list[int]:
        """The prompt of a chat (the chat template with the generation prompt appended)."""

    @abstractmethod
    def decode(self, token_ids: list[int]) -> str:
        """Text of output tokens ("" without a tokenizer)."""

    @abstractmethod
    def add(self, request_id: str, token_ids: list[int], params: GenerationParams,
            arrival_time: float | None = None) -> None:
        """Queue a request; ValueError (queuing nothing) if it is invalid or can never run.
        `arrival_time`: when the server took it in (time.perf_counter seconds: on Linux
        CLOCK_MONOTONIC, one clock for every process of the host), default now. It is the
        request's arrival for TTFT and queue time, and, on the twin, for when it may join
        a step (a request that waited in a pipe while the twin slept is still on time)."""

    @abstractmethod
    def abort(self, request_id: str) -> bool:
        """True: the request is gone and frees its blocks, no output will come. False: it
        is unknown, or finished with its output coming from the next step()."""

    @abstractmethod
    def step(self) -> list[Finished]:
        """Run one step (if there is work); the requests that left the backend."""

    def step_due(self) -> tuple[list[Finished], float | None]:
        """step(), for a caller that hands the results on itself: the results, and when
        they are due (perf_counter seconds; None: at once). A paced backend (the twin)
        computes its step at once and says when the GPU it simulates would have made the
        tokens: the caller prepares what it sends (new tokens, the message) first, sleeps
        until then (`sleep_until`) and sends, so the tokens leave on time, not a message's
        work after it."""
        return self.step(), None

    def take_lateness(self) -> list[float]:
        """A backend paced in a process of its own (the twin): how late (seconds) each step
        since the last call left for the server against its clock; else nothing."""
        return []

    @abstractmethod
    def output_tokens_since(self, request_id: str, start: int) -> list[int]:
        """Output tokens of an unfinished request from `start` on, as far as known."""

    @abstractmethod
    def has_unfinished(self) -> bool: ...

    def stats(self) -> dict:
        """The policy's state for /metrics: running, waiting, kv_usage, and the running
        totals preemptions, prefix_queries, prefix_hits (tokens). Here: from
        `self.scheduler`, the policy.Scheduler of an in-process backend."""
        s, bm = self.scheduler, self.scheduler.block_manager
        return {"running": s.num_running, "waiting": s.num_waiting, "kv_usage": bm.usage,
                "preemptions": s.num_preemptions, "prefix_queries": bm.queries,
                "prefix_hits": bm.hits}

    def reset_prefix_cache(self) -> None:
        """Empty the prefix cache (the pool keeps its blocks; the next prompts find no
        cached prefix), so that a benchmark run starts as an offline replay does. Called
        when no request is unfinished on the server's side; requests aborted meanwhile
        are stepped out first."""
        raise NotImplementedError(f"{type(self).__name__} cannot reset its prefix cache")

    def close(self) -> None:
        """Release devices and worker processes."""


class HFText:
    """Prompts and text through a Hugging Face tokenizer, or none (token-id prompts only,
    no text): the text half of a Backend that runs a real model (a base class of
    EngineBackend; on its own, the server side of an engine in another process)."""

    def __init__(self, name: str, tokenizer, vocab_size: int):
        self.name, self.tokenizer, self.vocab_size = name, tokenizer, vocab_size
        self.has_tokenizer = tokenizer is not None
        self.has_chat_template = getattr(tokenizer, "chat_template", None) is not None
        # bytes of the longest token (4 per character at most): bounds a prompt's length
        vocab = tokenizer.get_vocab() if tokenizer is not None else {}
        self.max_token_bytes = 4 * max((len(t) for t in vocab), default=16)

    def tokenize(self, prompt):
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"a text prompt needs a tokenizer, and {self.name} has none; "
                                 "send token ids")
            return self.tokenizer.encode(prompt)
        return token_ids_in_vocab(prompt, self.vocab_size)

    def chat_tokens(self, messages):
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=True, return_dict=False))

    def decode(self, token_ids):
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class EngineBackend(HFText, Backend):
    """The real engine, in this process. `EngineBackend(model_path, **EngineConfig fields)`.
    (`server.process.engine_process` runs it in a process of its own.)"""

    MAX_STEP_RECORDS = 100_000   # steps of the engine's log a long-running server keeps

    def __init__(self, model: str, **engine_kwargs):
        from engine import LLMEngine, SamplingParams
        self.sampling_params = SamplingParams
        self.engine = engine = LLMEngine(model, **engine_kwargs)
        self.max_model_len = engine.config.max_model_len
        self.scheduler = engine.scheduler
        HFText.__init__(self, model, engine.tokenizer, engine.model_config.vocab_size)
        report = getattr(engine.model_runner, "skinny_report", None)
        if report:     # measured at start, per process: two engines may choose differently
            chosen = [f"{r['n']}x{r['k']}@{r['m']}" for r in report if r["skinny"]]
            print(f"skinny GEMM (measured at start) for {len(chosen)} of {len(report)} layer "
                  f"shapes @ rows: {' '.join(chosen) or 'none'}", file=sys.stderr, flush=True)
        # Kernels compiled after the warm-up, and the slowest steps: reported to stderr at
        # every prefix-cache reset (a benchmark run's start) and at close
        self.stalls = StallLog(KernelCensus.of_modules("engine.")
                               if engine.model_runner.device.type == "cuda" else None)
        self.stall_reports = 0
        if self.stalls.census is not None:
            census = self.stalls.census
            print(f"stalls: the warm-up compiled {census.count} variants of {len(census.kernels)} "
                  "Triton kernels", file=sys.stderr, flush=True)
        # The engine's start-up objects (modules, graphs) live as long as the server: out of
        # the garbage collector's scans, so no full collection stalls every stream for ~0.1 s
        gc.collect()
        gc.freeze()

    def add(self, request_id, token_ids, params, arrival_time=None):
        sp = self.sampling_params(temperature=params.temperature, top_k=params.top_k,
                                  top_p=params.top_p, max_tokens=params.max_tokens,
                                  ignore_eos=params.ignore_eos, seed=params.seed)
        self.engine.add_request(token_ids, sp, request_id=request_id,   # engine clock:
                                arrival_time=arrival_time)               # perf_counter

    def abort(self, request_id):
        return self.engine.abort(request_id)

    def step(self):
        outputs = self.engine.step()
        self.stalls.after_step(self.engine.loop.last_record)
        records = self.engine.step_records
        if len(records) > 2 * self.MAX_STEP_RECORDS:   # a server runs for days
            del records[:-self.MAX_STEP_RECORDS]
        return [Finished(o.request_id, o.token_ids, o.text, o.finish_reason, o.error,
                         m.num_prompt_tokens, m.num_cached_tokens, m.num_preemptions,
                         m.arrival_time, m.first_scheduled_time, m.token_times, m.finish_time)
                for o in outputs for m in (o.metrics,)]

    def output_tokens_since(self, request_id, start):
        return self.engine.output_tokens_since(request_id, start)

    def has_unfinished(self):
        return self.engine.has_unfinished()

    def reset_prefix_cache(self):
        while self.engine.has_unfinished():    # aborted requests of the step in flight
            self.engine.step()
        self.report_stalls(f"before prefix-cache reset {self.stall_reports + 1}")
        self.engine.reset()                      # a fresh policy over the same KV pool
        self.scheduler = self.engine.scheduler

    def report_stalls(self, title: str) -> None:
        """Print the stall log of the steps since the last report (if any) and restart it."""
        self.stall_reports += 1
        if self.stalls.steps:
            print(self.stalls.report(title), file=sys.stderr, flush=True)
        self.stalls.reset()

    def close(self):
        self.report_stalls("at close")
        self.engine.close()
