"""Engine configuration: one frozen dataclass, checked when built and again against the
model's config.json (`for_model`)."""
import os
from dataclasses import dataclass, replace

from engine.layers.attention import BACKENDS
from engine.models.config import ModelConfig
from policy import CacheConfig, SchedulerConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cuda", "cpu")
ATTENTION_BACKENDS = ("auto",) + BACKENDS
DEFAULT_MAX_MODEL_LEN = 8192


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything `LLM(model, **kwargs)` / `LLMEngine(model, **kwargs)` accepts.

    model: a local Hugging Face model directory (config.json + *.safetensors).
    dtype: weights and KV cache; "auto" = config.json's torch_dtype.
    device: "auto" = cuda when available, else cpu.
    gpu_memory_utilization: fraction of the GPU's total memory the engine may fill
        (weights + activations + KV cache); the KV pool gets what is left.
    num_gpu_blocks: exact KV pool size in blocks (tests, reproducible runs); None = sized
        from memory on the GPU, or a 1 GiB pool on the CPU.
    max_model_len: longest prompt + output; None = min(8192, max_position_embeddings).
    block_size, enable_prefix_caching: the paged KV cache (policy.CacheConfig).
    max_num_seqs, max_num_batched_tokens, scheduler_policy, long_prefill_token_threshold:
        the scheduler (policy.SchedulerConfig).
    enforce_eager: no CUDA graphs. tensor_parallel_size: GPUs (or CPU processes) the model
        is split over (NCCL all-reduces are captured in the CUDA graphs too).
    async_scheduling: schedule and launch step N+1 while step N runs on the device (hides
        the host's per-step work); None = on. With tensor parallelism rank 0 feeds the
        previous step's tokens into the inputs on its device before broadcasting them.
        Outputs are the same either way (see LLMEngine).
    attention_backend: one of engine.layers.attention.BACKENDS, or
        "auto" (triton on CUDA, torch on CPU); "torch" always runs eager (no CUDA graphs);
        "flashinfer" needs the flashinfer package and dtype float16 / bfloat16.
        seed: the engine's sampling stream. cuda_graph_max_tokens: the largest step replayed
        from a CUDA graph (policy.cuda_graphs: decode steps by batch size, mixed
        prefill+decode steps by token count, padded to a captured size); larger steps run
        eagerly. 0 = decode and mixed steps all eager (as enforce_eager).
    skinny_gemm: on CUDA in bf16 / fp16 with CUDA graphs, measure at start, per linear layer
        shape (LM head included) and row count up to 64, the Triton skinny GEMM
        (engine.kernels.skinny_gemm) against torch's matmul under graph replay, and use it
        where it is faster; False = torch's matmul always (eager engines always use torch:
        a Triton launch from Python costs more host time than cuBLAS').
    pdl_max_tokens: on sm_90+ GPUs, steps of at most this many tokens launch their Triton
        kernels with programmatic dependent launch (engine.kernels.pdl): each starts while
        the one before finishes, prefetching its weights (skinny GEMM) or first KV tile
        (decode attention) into L2 meanwhile. 0 = never (plain stream order). Measured on
        the H200 (Qwen3-0.6B decode, context 1k): -12% step time at batch 1, -2% at 16,
        +2% at 64, hence 32. Ignored where unsupported (CPU, interpreter, before sm_90).
    kernel_plan: a file pinning the start-up kernel choices (engine.kernel_plan: skinny_gemm's,
        a 4-bit model's W4A16 launches, an MoE model's fused-MoE tiles) and the decode
        attention's split-KV rule: where it exists (a plan, or a calibration that records
        one) the engine runs its choice and rule and times nothing; where it does not, the
        engine times as usual and writes it there. None: time at every start (two engines
        may then choose differently) and run the engine's own rule.
    attention_streams: in a step with both decode rows and prompt chunks (triton backend,
        CUDA), run the decode rows' attention kernel on a second stream beside the prompt
        chunks' prefill kernel, forked after the layer's K/V store and joined before its
        output projection, in CUDA graphs too (each graph captures the fork and join). The
        decode kernel is memory-bound and the prefill kernel compute-bound: on the H200 the
        pair took 8-25 us less per layer at 64 decodes beside 128-2,048 prompt tokens
        (benchmarks/bench_attention.py --stages overlap, session 18). Steps launched with
        programmatic dependent launch (at most pdl_max_tokens tokens) stay on one stream.
        Outputs are the same either way. Off by default until the engine's step table has
        measured it; ignored on the CPU and by other backends.
    kv_cache_init: what the KV pool holds before any step writes it, "zeros" (as allocated)
        or "random" (normal values, every rank; `calibrate.kv_cache_init=random` profiles
        over it: the profile's dummy sequences read blocks no prefill wrote, where a serving
        engine's decodes read written keys and values). Outputs never depend on it (a step reads only blocks it or
        an earlier step wrote); device time does: on the H200, Llama-3.1-8B decode steps over
        a random pool ran 1.7-3.2% slower than over zeros (benchmarks/fidelity/probe_engines.py).
    """
    model: str
    dtype: str = "auto"
    device: str = "auto"
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks: int | None = None
    max_model_len: int | None = None
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    scheduler_policy: str = "chunked"
    long_prefill_token_threshold: int = 0
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    cuda_graph_max_tokens: int = 8192
    tensor_parallel_size: int = 1
    async_scheduling: bool | None = None
    attention_backend: str = "auto"
    skinny_gemm: bool = True
    pdl_max_tokens: int = 32
    kernel_plan: str | None = None
    attention_streams: bool = False
    kv_cache_init: str = "zeros"
    seed: int = 0

    def __post_init__(self):
        _require(os.path.isfile(os.path.join(self.model, "config.json")),
                 f"model: {self.model!r} is not a model directory with a config.json (weights are "
                 "never downloaded; write a random one with `python -m engine.checkpoint "
                 "qwen3-0.6b /tmp/ckpt`)")
        _require(self.dtype in DTYPES, f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        _require(self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}")
        _require(self.attention_backend in ATTENTION_BACKENDS,
                 f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                 f"got {self.attention_backend!r}")
        _require(0 < self.gpu_memory_utilization <= 1,
                 f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _require(self.num_gpu_blocks is None or self.num_gpu_blocks >= 1,
                 f"num_gpu_blocks must be None (size from memory) or >= 1, got {self.num_gpu_blocks}")
        _require(self.max_model_len is None or self.max_model_len >= 1,
                 f"max_model_len must be None or >= 1, got {self.max_model_len}")
        _require(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
                 f"tensor_parallel_size must be an integer >= 1, got {self.tensor_parallel_size!r}")
        _require(isinstance(self.cuda_graph_max_tokens, int) and self.cuda_graph_max_tokens >= 0,
                 f"cuda_graph_max_tokens must be an integer >= 0, got {self.cuda_graph_max_tokens!r}")
        _require(isinstance(self.pdl_max_tokens, int) and not isinstance(self.pdl_max_tokens, bool)
                 and self.pdl_max_tokens >= 0,
                 f"pdl_max_tokens must be an integer >= 0 (0: no programmatic dependent launch), "
                 f"got {self.pdl_max_tokens!r}")
        _require(isinstance(self.skinny_gemm, bool),
                 f"skinny_gemm must be true or false, got {self.skinny_gemm!r}")
        _require(self.kernel_plan is None or (isinstance(self.kernel_plan, str) and self.kernel_plan),
                 f"kernel_plan must be a file path or None, got {self.kernel_plan!r}")
        _require(isinstance(self.attention_streams, bool),
                 f"attention_streams must be true or false, got {self.attention_streams!r}")
        _require(self.kv_cache_init in ("zeros", "random"),
                 f"kv_cache_init must be zeros or random, got {self.kv_cache_init!r}")
        # The policy configs check their own fields (block_size, budgets, policy name).
        self.cache_config()
        if self.max_model_len is not None:
            self.scheduler_config().validate_with(self.cache_config())

    def for_model(self, model_config: ModelConfig) -> "EngineConfig":
        """Check against the model (engine.models.ModelConfig of config.json) and fill in
        max_model_len."""
        where = f"(model {self.model})"
        try:
            model_config.check_tp(self.tensor_parallel_size)
        except ValueError as e:
            raise ValueError(f"{e} {where}") from None
        max_position = model_config.max_position_embeddings
        if self.max_model_len is None:
            return replace(self, max_model_len=min(DEFAULT_MAX_MODEL_LEN, max_position))
        _require(self.max_model_len <= max_position,
                 f"max_model_len={self.max_model_len} exceeds the model's "
                 f"max_position_embeddings={max_position} {where}")
        return self

    def cache_config(self) -> CacheConfig:
        return CacheConfig(block_size=self.block_size,
                           enable_prefix_caching=self.enable_prefix_caching)

    def scheduler_config(self) -> SchedulerConfig:
        """Needs max_model_len resolved (after `for_model`)."""
        return SchedulerConfig(policy=self.scheduler_policy, max_num_seqs=self.max_num_seqs,
                               max_num_batched_tokens=self.max_num_batched_tokens,
                               max_model_len=self.max_model_len,
                               long_prefill_token_threshold=self.long_prefill_token_threshold)
