"""The engine loop: requests in, policy.Scheduler decides each step, ModelRunner executes it.

    engine = LLMEngine("/tmp/ckpt", num_gpu_blocks=512)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=8))
    while engine.has_unfinished():
        for out in engine.step(): print(out.request_id, out.token_ids)
"""
import atexit
import json
import math
import os
import time
from array import array
from dataclasses import dataclass, replace

import numpy as np

from engine.config import EngineConfig
from engine.distributed import Workers, rank_device
from engine.layers.attention import resolve_backend
from engine.model_runner import ModelRunner
from engine.models import ModelConfig
from engine.sampling_params import SamplingParams
from policy import Scheduler, Sequence
from policy.decode_plan import DecodePlan
from policy.sequence import PLACEHOLDER  # noqa: F401  (re-exported: engine.serve reads it)
from policy.step_loop import StepLoop

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True, slots=True)
class RequestMetrics:
    """When things happened to a request (engine clock: time.perf_counter seconds) and what
    it cost. TTFT = first_token_time - arrival_time; token_times give the ITLs."""
    arrival_time: float
    first_scheduled_time: float | None
    first_token_time: float | None
    finish_time: float | None
    token_times: tuple[float, ...]
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    num_preemptions: int


@dataclass(frozen=True, slots=True)
class RequestOutput:
    """A finished request. `text` is None when the model has no tokenizer. A request whose
    step failed has finish_reason "error", `error` saying why, and the tokens it had."""
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str | None
    finish_reason: str | None
    metrics: RequestMetrics
    error: str | None = None


def load_tokenizer(path: str):
    """The checkpoint's Hugging Face tokenizer, or None when it ships none (our random
    checkpoints: prompts are then token ids)."""
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def load_eos_token_ids(path: str, model_config: ModelConfig) -> list[int]:
    """generation_config.json's eos_token_id (what HF generate stops on), else config.json's."""
    file = os.path.join(path, "generation_config.json")
    if os.path.isfile(file):
        with open(file) as f:
            eos = json.load(f).get("eos_token_id")
        if eos is not None:
            return list(eos) if isinstance(eos, list) else [eos]
    return list(model_config.eos_token_ids)


class LLMEngine:
    """Continuous batching over one model. `LLMEngine(model_path, **EngineConfig fields)`.

    add_request queues a request; each `step()` runs policy.step_loop's rule (schedule ->
    launch -> receive the previous step -> update) and returns the requests that finished.
    `step_records` holds one row per step: policy.StepLoop's record (start_s, launch_s,
    tokens_s, end_s, duration_s and the batch's features, on `clock`) plus `device_s` and
    `gpu_gap_s` (the runner's CUDA-event timings) and `cpu_s` (the part of the step() that
    formed the step not spent waiting for the device). `sequences` maps the ids of
    unfinished requests to their policy Sequence.

    Asynchronous scheduling (`async_scheduling`, on by default):
    step N+1 is scheduled and launched while step N runs on the device, so the host's work
    hides behind the device's. The policy sees each sampled token as a placeholder until
    the next step() receives it (`Scheduler.receive`; the runner feeds it to step N+1 on
    the device). A stop token is therefore seen one step late: that sequence's slot in step
    N+1 is wasted and it finishes then, with the same output as without async scheduling.
    Outputs of finished requests come back from the step() after the one that finished them.
    """

    def __init__(self, model: str, **kwargs):
        config = EngineConfig(model=model, **kwargs)       # checks the path first
        model_config = ModelConfig.from_pretrained(model)
        self.config = config = config.for_model(model_config)
        self.model_config = model_config
        self.tokenizer = load_tokenizer(model)
        self.eos_token_ids = load_eos_token_ids(model, model_config)
        device = rank_device(config, 0)
        self.workers = None
        if config.tensor_parallel_size > 1:
            self.workers = Workers(config, model_config, device)
            atexit.register(self.close)
        try:
            self.model_runner = ModelRunner(config, model_config, 0, device, peers=self.workers)
        except Exception as e:
            if not isinstance(e, ValueError):   # a config error is every rank's: report ours
                self._raise_worker_error(e)
            self.close()
            raise
        self.scheduler = Scheduler(config.scheduler_config(), config.cache_config(),
                                   self.model_runner.num_blocks, decode_plan=self.decode_plan())
        self.sequences: dict[str, Sequence] = {}
        self.sampling_params: dict[str, SamplingParams] = {}
        self.step_records: list[dict] = []
        self.clock = time.perf_counter     # replaceable (experiments shift it to the replay's start)
        self._next_request_id = 0
        self.async_scheduling = config.async_scheduling is not False
        self.loop = StepLoop(self.scheduler, self._launch, self._wait, lambda: self.clock(),
                             self.async_scheduling, self.step_records)
        self._blocked_s = 0.0   # seconds the current step() spent waiting for the device
        self._batches: list = []   # batches the current step() touches (failure handling)

    def decode_plan(self) -> DecodePlan | None:
        """The split-KV plan rank 0's decode kernel runs with (its KV heads, SMs and captured
        decode graphs): every step's record then has `decode_span_tokens`, which the fitted
        cost model prices. None unless the Triton kernels run (the other backends plan
        decode attention their own way, or not at all)."""
        runner = self.model_runner
        if resolve_backend(self.config.attention_backend, runner.device) != "triton":
            return None
        packer = runner.packer
        return replace(packer.decode_plan, decode_graph_sizes=tuple(packer.decode_sizes))

    # ---- requests -------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                    request_id: str | None = None, arrival_time: float | None = None) -> str:
        """Queue a prompt (text, or token ids). Raises ValueError, and queues nothing, if the
        request is malformed or can never run."""
        params = SamplingParams() if sampling_params is None else sampling_params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        params = params.for_vocab(self.model_config.vocab_size)
        if request_id is None:
            request_id = str(self._next_request_id)
            self._next_request_id += 1
        if request_id in self.sequences:
            raise ValueError(f"request {request_id!r} is already queued or running")
        token_ids = self.tokenize(prompt, request_id)
        seq = Sequence(request_id, token_ids, params.max_tokens,
                       arrival_time=self.clock() if arrival_time is None else arrival_time,
                       ignore_eos=params.ignore_eos, eos_token_id=self.eos_token_ids or None)
        self.scheduler.add(seq)
        self.sequences[request_id] = seq
        self.sampling_params[request_id] = params
        return request_id

    def tokenize(self, prompt: str | list[int], request_id: str = "") -> list[int] | array:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"request {request_id!r}: a text prompt needs a tokenizer, and "
                                 f"{self.config.model} has none; pass token ids instead")
            return self.tokenizer.encode(prompt)
        # Checked and copied in C: a replay admits its arrivals between steps, so a Python
        # pass per token (a few thousand per prompt) is host time the next step waits for.
        try:
            ids = np.asarray(prompt)
        except (OverflowError, ValueError) as e:
            raise ValueError(f"request {request_id!r}: token ids must be integers ({e})") from None
        if ids.size == 0:
            return array("q")
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"request {request_id!r}: token ids must be a flat sequence of "
                             f"integers, got {ids.dtype} of shape {ids.shape}")
        vocab = self.model_config.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            bad = ids[(ids < 0) | (ids >= vocab)][0]
            raise ValueError(f"request {request_id!r}: token id {bad} is outside the "
                             f"vocabulary [0, {vocab})")
        return array("q", ids.astype(np.int64, copy=False).tobytes())

    def abort(self, request_id: str) -> bool:
        """Drop an unfinished request and free its KV blocks: True, and no output will come.
        False if the request is unknown, or already finished with its output still to come
        from the next step() (asynchronous scheduling): an abort never loses an output
        silently."""
        if not self.scheduler.abort(request_id):
            return False
        self.sequences.pop(request_id, None)
        self.sampling_params.pop(request_id, None)
        return True

    def output_tokens_since(self, request_id: str, start: int) -> list[int]:
        """The output tokens of an unfinished request from index `start` on, as far as the
        host has received them (with asynchronous scheduling the newest is still on the
        device). Empty if the request is unknown or finished."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.is_finished:
            return []
        end = seq.num_tokens - (seq.token_ids[-1] == PLACEHOLDER)
        return seq.token_ids[seq.num_prompt_tokens + start:end].tolist()

    def has_unfinished(self) -> bool:
        return self.loop.has_work()

    def reset(self) -> None:
        """Forget every request, the step log and the prefix cache: a fresh Scheduler over
        the same KV pool, so independent runs share one engine (its start-up, compilation
        and CUDA graphs). Needs an idle engine."""
        if self.has_unfinished():
            raise RuntimeError("reset() needs an idle engine: requests are still running")
        config = self.config
        self.scheduler = Scheduler(config.scheduler_config(), config.cache_config(),
                                   self.model_runner.num_blocks, decode_plan=self.decode_plan())
        self.sequences.clear()
        self.sampling_params.clear()
        self.step_records = []
        self.loop = StepLoop(self.scheduler, self._launch, self._wait, lambda: self.clock(),
                             self.async_scheduling, self.step_records)
        self.clock = time.perf_counter

    # ---- the step -------------------------------------------------------------------

    def step(self, now: float | None = None) -> list[RequestOutput]:
        """One turn of the step loop (policy.step_loop): schedule at `now` (default: the
        clock; a driver that admitted arrivals up to a time passes that time), launch,
        receive the previous step's tokens, update. Returns the requests finished so far.
        Without async scheduling this step's tokens are received at once.

        A failure inside the step ends the requests of the batches it touched (this step's
        and the one in flight) with finish_reason "error", frees their blocks and returns
        them; the engine keeps serving the rest. With tensor parallelism it is fatal (the
        ranks may no longer agree) and raises."""
        start = self.clock() if now is None else now
        self._blocked_s = 0.0
        self._batches = [self.loop.in_flight.batch] if self.loop.in_flight is not None else []
        try:
            done = self.loop.step(start)
        except Exception as error:
            if self.config.tensor_parallel_size > 1:
                raise
            return self._fail(self._batches, error)
        record = self.loop.last_record
        if record is not None:
            record.setdefault("device_s", math.nan)      # a step that only preempted
            record.setdefault("gpu_gap_s", math.nan)
            record["cpu_s"] = record["duration_s"] - self._blocked_s
        return [self._output(seq) for seq in done if seq.seq_id in self.sequences]

    def _fail(self, batches, error: Exception) -> list[RequestOutput]:
        """End every request of `batches` still known with finish_reason "error" and forget
        the step in flight."""
        self.loop.in_flight = None
        now, message, outputs = self.clock(), f"{type(error).__name__}: {error}", []
        for batch in batches:
            for seq in batch.seqs:
                if seq.seq_id in self.sequences:
                    self.scheduler.finish(seq, "error", now)   # a no-op if it already finished
                    outputs.append(self._output(seq, error=message))
        return outputs

    def _launch(self, batch, previous, record):
        """StepLoop's launch: the runner queues the step (the previous step's sampled
        tokens, still on the device, feed this one's inputs)."""
        self._batches.append(batch)
        params = [self.sampling_params[seq.seq_id] for seq in batch.seqs]
        pending = previous.pending if previous is not None else None
        try:
            launched = self.model_runner.launch(batch, params, pending)
        except Exception as e:
            self._raise_worker_error(e)
            raise
        if self.model_runner.device.type != "cuda":   # the forward ran inside launch
            self._blocked_s += launched.device_s
        record["device_s"] = record["gpu_gap_s"] = math.nan   # known once received
        return launched

    def _wait(self, launched, record) -> list[int]:
        """StepLoop's wait: the step's tokens, and its device timings into its record."""
        tokens = self.model_runner.wait(launched)
        self._blocked_s += self.model_runner.wait_s
        record["device_s"], record["gpu_gap_s"] = launched.device_s, launched.gap_s
        return tokens

    def _output(self, seq: Sequence, error: str | None = None) -> RequestOutput:
        """The request's output; with `error`, a failed one (received tokens only)."""
        self.sequences.pop(seq.seq_id, None)
        self.sampling_params.pop(seq.seq_id, None)
        token_ids = seq.output_token_ids
        if error is not None:
            token_ids = [t for t in token_ids if t != PLACEHOLDER]
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        metrics = RequestMetrics(
            arrival_time=seq.arrival_time, first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time, finish_time=seq.finish_time,
            token_times=tuple(seq.token_times), num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=len(token_ids), num_cached_tokens=seq.num_cached_tokens,
            num_preemptions=seq.num_preemptions)
        return RequestOutput(seq.seq_id, seq.prompt_token_ids, token_ids, text,
                             "error" if error else seq.finish_reason, metrics, error)

    # ---- shutdown -------------------------------------------------------------------

    def _raise_worker_error(self, error: Exception) -> None:
        """With tensor parallelism a collective fails when a worker dies: raise the
        worker's own traceback instead (if it sent one)."""
        if self.workers is not None:
            try:
                self.workers.check(wait_s=5.0)
            except RuntimeError as worker_error:
                self.close()
                raise worker_error from error

    def close(self) -> None:
        """Stop the tensor-parallel workers and give back the device memory this engine
        holds (CUDA graphs, KV cache, weights), so that another engine fits in the same
        process (a sweep over engine settings). Idempotent; also runs at exit. The engine
        cannot run steps afterwards."""
        workers, self.workers = self.workers, None
        runner = getattr(self, "model_runner", None)
        if workers is not None:
            atexit.unregister(self.close)
            if runner is not None:   # NCCL cannot tear down a communicator that live graphs use
                runner.graphs.clear()
            workers.close(stop=runner.stop_followers if runner else None)
        if runner is not None:
            runner.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
