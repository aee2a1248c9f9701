"""The simulated backend: the engine's policy (`policy.Scheduler`, same config) with the
simulator's cost model standing in for the GPU, paced in real time. A laptop serves the
API as a given model on a given GPU would: each step sleeps for the step time the cost
model predicts, so TTFT, inter-token latency and throughput under load are the twin's.

No model runs: every output token is a placeholder (text " tok" each), and requests run
to max_tokens (there is no EOS to sample); `usage` counts the true tokens. Prompts are
token ids, or text split into 4-byte pieces (one token each, the same text gives the same
ids, so prefix caching behaves) since no tokenizer is loaded.
"""
import time
from pathlib import Path

import yaml

from policy import CacheConfig, Scheduler, SchedulerConfig, Sequence
from server.backend import Backend, Finished, GenerationParams

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
BYTES_PER_TOKEN = 4
PLACEHOLDER_TEXT = " tok"


def read_conf(group: str, name: str) -> dict:
    """conf/<group>/<name>.yaml (or a .yaml path) as a dict."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else CONF_DIR / group / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        raise ValueError(f"unknown {group} {name!r}: no {path}; known: {known}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping")
    return data


def step_time_model(model_name: str, hf_config: dict, hardware: dict, cost_model: str,
                    calibration: str | None, tp: int, block_size: int,
                    gpu_memory_utilization: float):
    """(seconds of one step as a function of the Batch, KV blocks the GPU would hold): the
    server's only use of the simulator package."""
    from simulator import CostModelConfig, HardwareSpec, ModelSpec, build_cost_model, kv_pool_blocks
    spec = ModelSpec.from_hf_config(hf_config, name=model_name)
    hw = HardwareSpec(**hardware)
    cost = build_cost_model(CostModelConfig(kind=cost_model, path=calibration), spec, hw, tp=tp)
    cost.reset()
    num_blocks = kv_pool_blocks(spec, hw, block_size, gpu_memory_utilization, tp=tp)
    return (lambda batch: cost.predict(batch.features())), num_blocks


class SimBackend(Backend):
    """`SimBackend("qwen3-0.6b", "h200")`: conf/model and conf/hardware names (or .yaml
    paths); the policy fields as in engine.EngineConfig."""

    def __init__(self, model: str, hardware: str, cost_model: str = "roofline",
                 calibration: str | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, num_gpu_blocks: int | None = None,
                 max_model_len: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 scheduler_policy: str = "chunked", long_prefill_token_threshold: int = 0,
                 enable_prefix_caching: bool = True):
        model_conf = read_conf("model", model)
        hf_config = model_conf.get("hf_config")
        if not isinstance(hf_config, dict) or "vocab_size" not in hf_config:
            raise ValueError(f"model {model!r}: its conf needs an hf_config with vocab_size")
        self.name = model_conf.get("name", model)
        self.step_time, pool_blocks = step_time_model(
            self.name, hf_config, read_conf("hardware", hardware), cost_model, calibration,
            tensor_parallel_size, block_size, gpu_memory_utilization)
        self.vocab_size = hf_config["vocab_size"]
        self.max_model_len = max_model_len or min(8192, hf_config.get("max_position_embeddings", 8192))
        scheduler_config = SchedulerConfig(
            policy=scheduler_policy, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=self.max_model_len,
            long_prefill_token_threshold=long_prefill_token_threshold)
        cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(scheduler_config, cache_config, num_gpu_blocks or pool_blocks)
        self.has_tokenizer = self.has_chat_template = True   # the byte-piece stand-in
        self.max_token_bytes = BYTES_PER_TOKEN
        self.sequences: dict[str, Sequence] = {}
        self.token_of: dict[str, int] = {}
        self.clock = time.perf_counter
        self.busy_until: float | None = None   # when the simulated GPU ends its last step

    # ---- prompts (any thread) ----------------------------------------------------------
    def tokenize(self, prompt):
        if isinstance(prompt, str):
            data = prompt.encode("utf-8")
            return [int.from_bytes(data[i:i + BYTES_PER_TOKEN], "little") % self.vocab_size
                    for i in range(0, len(data), BYTES_PER_TOKEN)]
        token_ids = [int(t) for t in prompt]
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return token_ids

    def chat_tokens(self, messages):
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
        return self.tokenize(text)

    def decode(self, token_ids):
        return PLACEHOLDER_TEXT * len(token_ids)

    # ---- the engine thread ---------------------------------------------------------------
    def add(self, request_id, token_ids, params: GenerationParams):
        if not (isinstance(params.max_tokens, int) and params.max_tokens >= 1):
            raise ValueError(f"max_tokens must be a positive integer, got {params.max_tokens!r}")
        if request_id in self.sequences:
            raise ValueError(f"request {request_id!r} is already queued or running")
        seq = Sequence(request_id, token_ids, params.max_tokens, arrival_time=self.clock(),
                       ignore_eos=True)
        self.scheduler.add(seq)
        self.sequences[request_id] = seq
        self.token_of[request_id] = hash(request_id) % self.vocab_size

    def abort(self, request_id):
        if not self.scheduler.abort(request_id):
            return False
        self.sequences.pop(request_id, None)
        self.token_of.pop(request_id, None)
        return True

    def step(self):
        """Schedule, sleep until the simulated GPU would finish the step, update. Steps
        follow one another on the simulated GPU's timeline: a step starts when the last one
        ended (not when this thread got round to it), so the host's own lateness is caught
        up instead of added to every step; the timeline restarts when the backend is idle."""
        now = self.clock()
        batch = self.scheduler.schedule(now)
        if not batch.seqs:
            self.busy_until = None
            return []
        start = now if self.busy_until is None else min(now, self.busy_until)
        self.busy_until = start + self.step_time(batch)
        delay = self.busy_until - self.clock()
        if delay > 0:
            time.sleep(delay)
        tokens = [self.token_of[seq.seq_id] for seq in batch.seqs]
        finished = self.scheduler.update(batch, tokens, self.clock())
        if not self.scheduler.has_unfinished():
            self.busy_until = None
        return [self._finished(seq) for seq in finished]

    def _finished(self, seq: Sequence) -> Finished:
        del self.sequences[seq.seq_id], self.token_of[seq.seq_id]
        tokens = seq.output_token_ids
        return Finished(seq.seq_id, tokens, self.decode(tokens), seq.finish_reason, None,
                        seq.num_prompt_tokens, seq.num_cached_tokens, seq.num_preemptions,
                        seq.arrival_time, seq.first_scheduled_time, tuple(seq.token_times),
                        seq.finish_time)

    def output_tokens_since(self, request_id, start):
        seq = self.sequences.get(request_id)
        return [] if seq is None else seq.token_ids[seq.num_prompt_tokens + start:].tolist()

    def has_unfinished(self):
        return self.scheduler.has_unfinished()
