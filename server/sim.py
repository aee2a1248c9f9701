"""The simulated backend: the engine's policy (`policy.Scheduler`, same config) with the
simulator's cost model standing in for the GPU, paced in real time. A laptop serves the
API as a given model on a given GPU would: each step's tokens leave when the step time
the cost model predicts has passed on one clock anchored at the start, so TTFT,
inter-token latency and throughput under load are the twin's.

No model runs: every output token is a placeholder (text " tok" each), and requests run
to max_tokens (there is no EOS to sample); `usage` counts the true tokens. Prompts are
token ids, or text split into 4-byte pieces (one token each, the same text gives the same
ids, so prefix caching behaves) since no tokenizer is loaded.
"""
import time
from collections import deque
from pathlib import Path

import yaml

from policy import CacheConfig, Scheduler, SchedulerConfig, Sequence
from policy.sequence import PLACEHOLDER
from policy.step_loop import StepLoop
from server.backend import Backend, Finished, GenerationParams, sleep_until, token_ids_in_vocab

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


def twin_executor(model_name: str, hf_config: dict, hardware: dict, cost_model: str,
                  calibration: str | None, tp: int, block_size: int, gpu_memory_utilization: float,
                  max_num_seqs: int, max_num_batched_tokens: int, graph_limit: int, salt: dict):
    """The simulator's executor for this model, GPU and cost model (host costs, a device
    running one step after another), and the KV blocks that GPU would hold: the server's
    only use of the simulator package."""
    from simulator import (CostModelConfig, CudaGraphs, HardwareSpec, ModelSpec,
                           build_cost_model, kv_pool_blocks)
    from simulator.sim import SimExecutor
    spec = ModelSpec.from_hf_config(hf_config, name=model_name)
    hw = HardwareSpec(**hardware)
    graphs = CudaGraphs.for_engine(max_num_seqs, max_num_batched_tokens, graph_limit)
    cost = build_cost_model(CostModelConfig(kind=cost_model, path=calibration), spec, hw,
                            tp=tp, graphs=graphs, block_size=block_size)
    cost.reset()
    num_blocks = kv_pool_blocks(spec, hw, block_size, gpu_memory_utilization, tp=tp)
    return SimExecutor(cost, salt), num_blocks


class ByteText:
    """The simulated backend's stand-in for a tokenizer: text is one token per 4 UTF-8
    bytes (the same text, the same ids), output text is PLACEHOLDER_TEXT per token."""
    has_tokenizer = has_chat_template = True
    max_token_bytes = BYTES_PER_TOKEN

    def __init__(self, name: str, vocab_size: int):
        self.name, self.vocab_size = name, vocab_size

    @classmethod
    def of(cls, model: str) -> "ByteText":
        """The text half of SimBackend(model, ...), without building the backend."""
        conf = read_conf("model", model)
        return cls(conf.get("name", model), model_hf_config(conf, model)["vocab_size"])

    def tokenize(self, prompt):
        if isinstance(prompt, str):
            data = prompt.encode("utf-8")
            return [int.from_bytes(data[i:i + BYTES_PER_TOKEN], "little") % self.vocab_size
                    for i in range(0, len(data), BYTES_PER_TOKEN)]
        return token_ids_in_vocab(prompt, self.vocab_size)

    def chat_tokens(self, messages):
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"
        return self.tokenize(text)

    def decode(self, token_ids):
        return PLACEHOLDER_TEXT * len(token_ids)


def model_hf_config(conf: dict, model: str) -> dict:
    hf_config = conf.get("hf_config")
    if not isinstance(hf_config, dict) or "vocab_size" not in hf_config:
        raise ValueError(f"model {model!r}: its conf needs an hf_config with vocab_size")
    return hf_config


class SimBackend(ByteText, Backend):
    """`SimBackend("qwen3-0.6b", "h200")`: conf/model and conf/hardware names (or .yaml
    paths); the policy and engine fields as in engine.EngineConfig (async scheduling and
    CUDA-graph sizes as the engine's, which the twin follows).

    It runs the twin's own step loop (policy.StepLoop with simulator.sim.SimExecutor: host
    costs, a device running one step after another) on a timeline anchored to the wall
    clock at its start (`epoch`): a turn is computed at once and its results are due when
    the twin's clock says it ended (`step_due`; `step` sleeps until then), so tokens come
    when the simulated GPU would make them. Steps follow one another on that timeline
    (a host that falls behind catches up rather than adding its lateness to every step);
    a request joins the first turn formed after its arrival (the server's stamp, not the
    time the twin read it: the twin reads between turns, after sleeping), as in the
    offline simulator; idle, the clock jumps to the next arrival."""

    def __init__(self, model: str, hardware: str, cost_model: str = "roofline",
                 calibration: str | None = None, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.9, num_gpu_blocks: int | None = None,
                 max_model_len: int | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 scheduler_policy: str = "chunked", long_prefill_token_threshold: int = 0,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False,
                 cuda_graph_max_tokens: int = 8192, async_scheduling: bool | None = None):
        model_conf = read_conf("model", model)
        hf_config = model_hf_config(model_conf, model)
        ByteText.__init__(self, model_conf.get("name", model), hf_config["vocab_size"])
        self.salt: dict[str, int] = {}       # request -> the token id it generates
        self.executor, pool_blocks = twin_executor(
            self.name, hf_config, read_conf("hardware", hardware), cost_model, calibration,
            tensor_parallel_size, block_size, gpu_memory_utilization, max_num_seqs,
            max_num_batched_tokens, 0 if enforce_eager else cuda_graph_max_tokens, self.salt)
        self.max_model_len = max_model_len or min(8192, hf_config.get("max_position_embeddings", 8192))
        scheduler_config = SchedulerConfig(
            policy=scheduler_policy, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, max_model_len=self.max_model_len,
            long_prefill_token_threshold=long_prefill_token_threshold)
        cache_config = CacheConfig(block_size=block_size, enable_prefix_caching=enable_prefix_caching)
        self.async_scheduling = async_scheduling is not False
        # the cost model's decode plan, if it prices one: every step then records its span
        self.decode_plan = self.executor.cost.decode_plan
        self.fresh_policy(Scheduler(scheduler_config, cache_config, num_gpu_blocks or pool_blocks,
                                    decode_plan=self.decode_plan))
        self.probe = Scheduler(scheduler_config, cache_config, self.scheduler.block_manager.num_blocks)
        self.pending: deque[Sequence] = deque()   # added, not yet arrived on the twin's clock
        self.forget: list[str] = []               # aborted since the last step
        self.sequences: dict[str, Sequence] = {}
        self.epoch = time.perf_counter()      # the twin's time 0 on the wall clock

    def fresh_policy(self, scheduler: Scheduler) -> None:
        """Run `scheduler` (an empty one) from now on, on the same executor and clock."""
        ex = self.executor
        self.scheduler = scheduler
        self.loop = StepLoop(scheduler, ex.launch, ex.wait, ex.clock, self.async_scheduling)

    def reset_prefix_cache(self):
        while self.loop.has_work():        # aborted requests of the step in flight
            self.step()
        s, bm = self.scheduler, self.scheduler.block_manager
        self.fresh_policy(Scheduler(s.config, CacheConfig(bm.block_size, bm.enable_prefix_caching),
                                    bm.num_blocks, decode_plan=self.decode_plan))

    def now(self) -> float:
        """The wall clock on the twin's timeline."""
        return time.perf_counter() - self.epoch

    # ---- the engine thread ---------------------------------------------------------------
    def add(self, request_id, token_ids, params: GenerationParams, arrival_time=None):
        """Check the request against the policy now (ValueError), queue it until the
        twin's clock reaches its arrival (`arrival_time`, perf_counter seconds: when the
        server took it in, which may lie before now, as for a request that waited in the
        pipe while the twin slept; default now)."""
        if request_id in self.sequences:
            raise ValueError(f"request {request_id!r} is already queued or running")
        arrival = self.now() if arrival_time is None else arrival_time - self.epoch
        seq = Sequence(request_id, token_ids, params.max_tokens, arrival_time=arrival,
                       ignore_eos=True)
        self.probe.add(seq)
        self.probe.abort(request_id)
        self.pending.append(seq)
        self.sequences[request_id] = seq
        self.salt[request_id] = hash(request_id) % self.vocab_size

    def abort(self, request_id):
        seq = self.sequences.get(request_id)
        if seq is not None and seq in self.pending:
            self.pending.remove(seq)
        elif not self.scheduler.abort(request_id):
            return False
        self.sequences.pop(request_id, None)
        self.forget.append(request_id)   # its token is drawn if it is in the step in flight
        return True

    def step(self):
        """One turn of the twin (`step_due`), returned when its clock says it ended."""
        finished, due = self.step_due()
        sleep_until(due)
        return finished

    def step_due(self):
        """Admit the requests that have arrived by the twin's clock, run one turn of its
        step loop and return at once: the requests it finished, and when the turn ends on
        the wall clock (the twin's time + its epoch: one absolute clock, so lateness never
        accumulates). Behind the wall clock (due in the past) the twin catches up, and
        admits a request only once its clock has passed the arrival, as the offline
        simulator does; idle, its clock jumps to the next arrival."""
        ex, pending = self.executor, self.pending
        if not self.loop.has_work():
            if not pending:
                return [], None
            ex.t = max(ex.t, pending[0].arrival_time)
        while pending and pending[0].arrival_time <= ex.t:
            self.scheduler.add(pending.popleft())
        done = self.loop.step(ex.t)          # receives the step in flight: then forget
        for request_id in self.forget:
            self.salt.pop(request_id, None)
        self.forget.clear()
        finished = [self._finished(seq) for seq in done if seq.seq_id in self.sequences]
        return finished, self.epoch + ex.t

    def _finished(self, seq: Sequence) -> Finished:
        del self.sequences[seq.seq_id]
        self.salt.pop(seq.seq_id, None)
        tokens, epoch = seq.output_token_ids, self.epoch
        return Finished(seq.seq_id, tokens, self.decode(tokens), seq.finish_reason, None,
                        seq.num_prompt_tokens, seq.num_cached_tokens, seq.num_preemptions,
                        seq.arrival_time + epoch,
                        None if seq.first_scheduled_time is None else seq.first_scheduled_time + epoch,
                        tuple(t + epoch for t in seq.token_times),
                        None if seq.finish_time is None else seq.finish_time + epoch)

    def output_tokens_since(self, request_id, start):
        seq = self.sequences.get(request_id)
        if seq is None:
            return []
        end = seq.num_tokens - (seq.token_ids[-1] == PLACEHOLDER)
        return seq.token_ids[seq.num_prompt_tokens + start:end].tolist()

    def has_unfinished(self):
        return self.loop.has_work() or bool(self.pending)
