"""Replay a request trace on the simulator or the GPU engine, then write and log the results.

    trace -> materialize (token ids) -> executor -> requests/steps tables -> metrics
          -> requests.parquet, steps.parquet, summary.json -> logger -> printed summary

Both executors run the same policy (`policy.Scheduler`) on the same materialized requests
and return the policy Sequences, so the result files of a simulated and a real run can be
compared row for row.
"""
import dataclasses
import gc
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from analysis.metrics import compute_metrics, format_report
from experiments import results
from experiments.config import RunConfig, build
from experiments.logging import make_logger
from policy import Scheduler, Sequence
from traces import load_trace, materialize

log = logging.getLogger(__name__)
GPU_EXTRA = "mode=gpu needs the engine extra: pip install -e .[engine] and a GPU"
# Random weights: ckpt/ in a source checkout (gitignored), else the user's cache (a pip
# install must not write into site-packages).
_ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_DIR = (_ROOT / "ckpt" if (_ROOT / "conf").is_dir()
                  else Path.home() / ".cache" / "twinserve" / "ckpt")


@dataclass(slots=True)
class Replay:
    """What an executor hands back. `sequences`: every request's policy Sequence, in
    request order (seq_id = request_id); `steps`: `Batch.record` rows + replica, step;
    times on the executor's clock, where the replay started at `t0`."""
    sequences: list
    replica_of: dict
    steps: list
    duration_s: float
    wall_s: float
    num_blocks: int
    gpu: str | None = None
    t0: float = 0.0
    equivalence: dict | None = None    # cost_model=replay: what matched the recorded run
    decode_plan: dict | None = None    # the split rule its decode attention ran / was priced by (split_rule)


def split_rule(plan) -> dict | None:
    """What a run's summary records of a DecodePlan (`run.decode_plan`): the KV heads and SMs
    it plans for and the rule the kernel runs (policy.decode_plan.KERNEL_RULE_FIELDS), which
    analysis.compare sets side by side; None without a plan."""
    return {"num_kv_heads": plan.num_kv_heads, "num_sms": plan.num_sms, **plan.kernel_rule()} if plan else None


def split_rule_line(plan, kernel_plan: str | None) -> str:
    """One line on the split rule an engine's decode attention runs (`plan`, its
    decode_plan()) and where it comes from: the file its engine.kernel_plan names, where that
    pins another rule than the engine's own, or the engine's own."""
    from policy.decode_plan import DecodePlan
    if plan is None:
        return "decode split rule: none (the attention backend is not the Triton one)"
    own = DecodePlan(plan.num_kv_heads, plan.num_sms).kernel_rule()
    rule = plan.kernel_rule()
    if rule == own:
        return f"decode split rule: the engine's own (shortest share {rule['min_tokens_per_split']} tokens)"
    differs = ", ".join(f"{f} {v} (own {own[f]})" for f, v in rule.items() if v != own[f])
    return f"decode split rule: pinned by {kernel_plan}: {differs}"


def check_requests(requests, rc: RunConfig, num_blocks: int) -> None:
    """Fail before starting if a request can never run (too long for max_model_len or for
    the KV pool), with the scheduler's own message: the same check `Scheduler.add` does
    mid-run, where it would stop a long replay half way."""
    probe = Scheduler(rc.scheduler, rc.cache, num_blocks)
    for r in requests:
        try:
            probe.add(Sequence(r.request_id, r.prompt_token_ids, r.output_len, ignore_eos=True))
        except ValueError as e:
            fits = min(rc.scheduler.max_model_len, num_blocks * rc.cache.block_size)
            raise ValueError(f"trace {rc.trace.name!r}: {e}. Drop such requests with "
                             f"trace.max_total_len={fits}") from None


def load_requests(rc: RunConfig, vocab_size: int) -> list:
    """The trace's requests with token ids drawn for this vocabulary (deterministic in the
    trace config, so the simulator and the engine see the same prompts)."""
    return materialize(load_trace(rc.trace), rc.cache.block_size, vocab_size, rc.trace.seed)


def sim_cost_model(rc: RunConfig):
    """(ModelSpec, CostModel): the model description and the cost model the simulator prices
    this config's steps with (its CUDA graphs, block size and PDL rows as the engine's)."""
    from simulator import CudaGraphs, ModelSpec, build_cost_model
    hf_config = rc.hf_config
    if rc.engine.model_path is not None:   # the checkpoint the engine runs describes the model
        hf_config = json.loads((Path(rc.engine.model_path) / "config.json").read_text())
    model = ModelSpec.from_hf_config(hf_config, name=rc.model_name)
    graphs = CudaGraphs.for_engine(rc.scheduler.max_num_seqs, rc.scheduler.max_num_batched_tokens,
                                   rc.engine.graph_limit)
    return model, build_cost_model(rc.cost_model, model, rc.hardware, tp=rc.engine.tensor_parallel_size,
                                   graphs=graphs, block_size=rc.cache.block_size,
                                   pdl_max_tokens=rc.engine.pdl_max_tokens)


def replay_sim(rc: RunConfig) -> Replay:
    """Simulated time: step times come from the cost model; the simulator runs the engine's
    step loop with the engine's settings (async scheduling, CUDA-graph sizes)."""
    from simulator import Simulator, kv_pool_blocks
    model, cost_model = sim_cost_model(rc)
    recorded_blocks = recorded_num_blocks(rc)
    num_blocks = rc.num_blocks or recorded_blocks or kv_pool_blocks(
        model, rc.hardware, rc.cache.block_size, rc.gpu_memory_utilization, tp=rc.engine.tensor_parallel_size)
    requests = load_requests(rc, model.vocab_size)
    check_requests(requests, rc, num_blocks)
    sim = Simulator(rc.scheduler, rc.cache, cost_model, num_blocks,
                    num_replicas=rc.cluster.num_replicas, router=rc.cluster.router, seed=rc.seed,
                    async_scheduling=rc.engine.async_on)
    with tqdm(total=len(requests), unit="req", desc="sim", disable=not rc.progress) as bar:
        result = sim.run(requests, progress=bar.update)
    replay = Replay(result.sequences, result.replica_of, result.steps, result.duration_s,
                    result.wall_s, num_blocks, decode_plan=split_rule(cost_model.decode_plan))
    if rc.cost_model.kind == "replay":
        replay.equivalence = {"steps_identical": result.replayed_steps,
                              "steps_recorded": len(cost_model.records)}
    return replay


def recorded_num_blocks(rc: RunConfig) -> int | None:
    """With cost_model=replay: the KV pool of the recorded run (its summary.json, next to
    its steps.parquet; the engine sized it from GPU memory, the simulator must use the
    same), after checking that the recorded run used the policy settings of this one."""
    if rc.cost_model.kind != "replay":
        return None
    summary = Path(rc.cost_model.path).parent / "summary.json"
    if not summary.is_file():
        return None
    recorded = json.loads(summary.read_text())
    theirs = recorded.get("config", {})
    ours = {"scheduler": dataclasses.asdict(rc.scheduler), "trace": dataclasses.asdict(rc.trace),
            "cache": {"block_size": rc.cache.block_size,
                      "enable_prefix_caching": rc.cache.enable_prefix_caching}}
    for group, fields in ours.items():
        for key, value in json.loads(json.dumps(fields, default=str)).items():
            if key in theirs.get(group, {}) and theirs[group][key] != value:
                raise ValueError(f"cost_model=replay: {summary} was recorded with "
                                 f"{group}.{key}={theirs[group][key]!r}, this run has {value!r}")
    engine = theirs.get("engine", {})
    if engine:
        async_on = engine.get("async_scheduling") is not False    # as EngineSettings.async_on
        if async_on != rc.engine.async_on:
            raise ValueError(f"cost_model=replay: {summary} was recorded with async scheduling "
                             f"{'on' if async_on else 'off'}; set engine.async_scheduling="
                             f"{str(async_on).lower()}")
    return recorded.get("run", {}).get("num_blocks")


def compare_requests(table, recorded_path: Path) -> dict:
    """Requests whose timestamps equal the recorded run's (requests.parquet next to the
    replayed steps.parquet), and the first that differs."""
    import pandas as pd
    theirs = pd.read_parquet(recorded_path).set_index("request_id")
    ours = table.set_index("request_id")
    columns = ["arrival_s", "first_scheduled_s", "first_token_s", "finish_s", "num_preemptions",
               "cached_prompt_tokens", "output_len"]
    same, first = 0, None
    for rid in ours.index:
        a, b = ours.loc[rid], theirs.loc[rid] if rid in theirs.index else None
        ok = b is not None and all(a[c] == b[c] for c in columns) and \
            list(a["token_times_s"]) == list(b["token_times_s"])
        same += ok
        if not ok and first is None:
            first = rid
    return {"requests_identical": same, "requests": len(ours), "first_differing_request": first}


def replay_gpu(rc: RunConfig, engine=None) -> Replay:
    """Online replay in wall time: a request is added once the clock passes its arrival
    (its arrival time stays the trace's, so waiting behind a running step counts in its
    TTFT); the engine steps while it has work and sleeps until the next arrival when idle.
    The engine's clock is shifted to start at 0 with the replay, and each step is formed at
    the time the arrivals were polled: what the simulator needs to replay it exactly.
    Token ids are drawn for the checkpoint's vocabulary. `engine`: reuse this engine (it
    must match the config; it is reset, and left open) instead of building one."""
    import torch
    from engine import SamplingParams
    owned = engine is None
    if owned:
        engine = build_engine(rc)
    else:
        check_engine(engine, rc)
        engine.reset()
    try:
        num_blocks = engine.scheduler.block_manager.num_blocks
        requests = load_requests(rc, engine.model_config.vocab_size)
        check_requests(requests, rc, num_blocks)
        warm_up(engine, rc)
        plan = engine.decode_plan()     # the split rule its decode attention runs (the summary's)
        log.info(split_rule_line(plan, engine.config.kernel_plan))
        # A full garbage collection scans every object the engine built (modules, graphs:
        # hundreds of thousands) and took 120-150 ms when one fell on the first steps of a
        # freshly built engine's replay; collect now and freeze what is left, as serving
        # engines do after start-up, so no such pause is charged to the trace.
        gc.collect()
        gc.freeze()
        sequences = {}      # engine.sequences forgets finished requests; keep them here
        pending = deque(requests)
        wall_start = time.perf_counter()
        t0 = time.perf_counter()
        engine.clock = lambda: time.perf_counter() - t0
        with tqdm(total=len(requests), unit="req", desc="gpu", disable=not rc.progress) as bar:
            while pending or engine.has_unfinished():
                now = engine.clock()
                while pending and pending[0].arrival_s <= now:
                    r = pending.popleft()
                    engine.add_request(r.prompt_token_ids,   # int64 array: checked in C
                                       SamplingParams(max_tokens=r.output_len, ignore_eos=True),
                                       request_id=r.request_id, arrival_time=r.arrival_s)
                    sequences[r.request_id] = engine.sequences[r.request_id]
                if engine.has_unfinished():
                    bar.update(len(engine.step(now)))
                elif pending:
                    time.sleep(max(0.0, pending[0].arrival_s - engine.clock()))
        wall_s = time.perf_counter() - wall_start
    finally:
        gc.unfreeze()
        if owned:
            engine.close()
    ordered = [sequences[r.request_id] for r in requests]
    duration = max((seq.finish_time for seq in ordered), default=0.0)
    gpu = torch.cuda.get_device_name() if rc.engine.device == "cuda" else None
    return Replay(ordered, {}, engine.step_records, duration, wall_s, num_blocks, gpu=gpu,
                  decode_plan=split_rule(plan))


def engine_kwargs(rc: RunConfig) -> dict:
    """engine.EngineConfig fields for the engine `rc` describes (the model path apart)."""
    return dict(dtype=rc.engine.dtype, device=rc.engine.device,
                gpu_memory_utilization=rc.gpu_memory_utilization,
                num_gpu_blocks=rc.num_blocks, max_model_len=rc.scheduler.max_model_len,
                block_size=rc.cache.block_size,
                enable_prefix_caching=rc.cache.enable_prefix_caching,
                max_num_seqs=rc.scheduler.max_num_seqs,
                max_num_batched_tokens=rc.scheduler.max_num_batched_tokens,
                scheduler_policy=rc.scheduler.policy,
                long_prefill_token_threshold=rc.scheduler.long_prefill_token_threshold,
                enforce_eager=rc.engine.enforce_eager,
                cuda_graph_max_tokens=rc.engine.cuda_graph_max_tokens,
                tensor_parallel_size=rc.engine.tensor_parallel_size,
                attention_backend=rc.engine.attention_backend,
                async_scheduling=rc.engine.async_scheduling, skinny_gemm=rc.engine.skinny_gemm,
                pdl_max_tokens=rc.engine.pdl_max_tokens, kernel_plan=rc.engine.kernel_plan,
                attention_streams=rc.engine.attention_streams,
                seed=rc.seed)


def build_engine(rc: RunConfig, **settings):
    """The engine `rc` describes (mode=gpu replays, calibration), with `settings` (EngineConfig
    fields rc does not carry) on top. Raises RuntimeError, saying what is missing, where the
    engine cannot run."""
    try:
        import torch
        from engine import LLMEngine
    except ImportError as e:
        raise RuntimeError(f"{GPU_EXTRA} ({e})") from None
    if rc.engine.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{GPU_EXTRA}: torch.cuda.is_available() is False here "
                           "(engine.device=cpu runs tiny models on the CPU)")
    return LLMEngine(model_path(rc), **engine_kwargs(rc), **settings)


def check_engine(engine, rc: RunConfig) -> None:
    """A reused engine must be the one `rc` describes (ValueError naming the field)."""
    for key, value in engine_kwargs(rc).items():
        if value is not None and getattr(engine.config, key) != value:
            raise ValueError(f"the engine passed in has {key}={getattr(engine.config, key)!r}, "
                             f"this run wants {value!r}")


def warm_up(engine, rc: RunConfig) -> None:
    """Run a few throwaway requests before the clock starts, so kernel compilation (Triton,
    torch.compile) and CUDA-graph first replays are not charged to the trace's first
    requests (`vllm bench serve --num-warmups` does the same). Then the engine is reset:
    their steps leave the step log and their blocks the prefix cache, so the replay starts
    from the empty pool the simulator starts from."""
    from engine import SamplingParams
    longest = min(rc.scheduler.max_model_len, rc.scheduler.max_num_batched_tokens) - 8
    lengths = sorted({max(1, n) for n in (8, 64, longest // 2, longest)})
    if rc.engine.device == "cpu":    # the torch path compiles nothing: one short request
        lengths = [8]
    log.info(f"warming up the engine: {len(lengths)} requests of {lengths} prompt tokens")
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ids = [engine.add_request([0] * n, params, request_id=f"warmup-{n}") for n in lengths]
    while engine.has_unfinished():
        engine.step()
    assert not any(i in engine.sequences for i in ids)
    engine.reset()


def model_path(rc: RunConfig) -> str:
    """engine.model_path, or a random-weight checkpoint of the `model` group's architecture
    in ckpt/<model>-<dtype>/ at the repository root, written once and reused while its
    config.json matches (writing an 8B model takes minutes)."""
    if rc.engine.model_path is not None:
        return rc.engine.model_path
    from engine.checkpoint import write_random_checkpoint
    dtype = rc.engine.dtype
    if dtype == "auto":
        dtype = rc.hf_config.get("torch_dtype", "bfloat16")
    path = CHECKPOINT_DIR / f"{rc.model_name}-{dtype}"
    config_file = path / "config.json"
    wanted = {k: v for k, v in rc.hf_config.items() if k != "dtype"} | {"torch_dtype": dtype}
    if not (config_file.is_file() and json.loads(config_file.read_text()) == wanted):
        log.info(f"writing a random-weight checkpoint of {rc.model_name} ({dtype}) to {path}")
        write_random_checkpoint(rc.hf_config, path, dtype=dtype, seed=rc.seed,
                                progress=rc.progress)
    return str(path)


def equivalence_line(eq: dict) -> str:
    line = (f"policy equivalence: {eq['steps_identical']}/{eq['steps_recorded']} steps identical")
    if "requests" in eq:
        line += f", {eq['requests_identical']}/{eq['requests']} requests with identical timestamps"
        if eq["first_differing_request"] is not None:
            line += f" (first differing: {eq['first_differing_request']!r})"
    return line


def run(cfg: DictConfig, run_dir, name: str | None = None, group: str | None = None,
        engine=None) -> dict:
    """One replay of the composed config `cfg`; results go to `run_dir`. Returns the
    metrics. `name`/`group` label the wandb run (Hydra's override string / sweep).
    `engine` (mode=gpu): an LLMEngine to reuse across runs (benchmarks/fidelity)."""
    rc = build(cfg)
    run_dir = Path(run_dir)
    replay = replay_sim(rc) if rc.mode == "sim" else replay_gpu(rc, engine)
    requests_table = results.request_table(replay.sequences, replay.replica_of, replay.t0)
    steps_table = results.step_table(replay.steps, replay.num_blocks, replay.t0)
    metrics = compute_metrics(requests_table, duration_s=replay.duration_s, slos=rc.slo.as_dict())
    config = OmegaConf.to_container(cfg, resolve=True)
    if replay.equivalence is not None:
        recorded = Path(rc.cost_model.path).parent / "requests.parquet"
        if recorded.is_file():
            replay.equivalence.update(compare_requests(requests_table, recorded))
    backend, load = results.backend(rc, replay.gpu), results.load(rc.trace)
    summary = {"config": config, "metrics": metrics, "versions": results.versions(),
               "gpu": replay.gpu, "mode": rc.mode, "backend": backend, "load": load,
               "equivalence": replay.equivalence,
               "run": {"num_requests": len(requests_table), "num_blocks": replay.num_blocks,
                       "num_steps": len(steps_table), "wall_s": replay.wall_s,
                       "decode_plan": replay.decode_plan}}
    results.write(run_dir, requests_table, steps_table, summary)
    logger = make_logger(rc.logger, run_dir, config, name=name or run_dir.name, group=group,
                         job_type=rc.mode)
    try:
        logger.log_summary(metrics)
        logger.log_steps(steps_table)
        logger.log_cdfs(requests_table)
    finally:
        logger.finish()
    equivalence = ("\n" + equivalence_line(replay.equivalence)) if replay.equivalence is not None else ""
    log.info(f"backend: {backend}\nload: {load['text']}\n{format_report(metrics)}{equivalence}\n"
             f"results: {run_dir} ({len(requests_table)} requests, {len(steps_table)} steps, "
             f"{replay.wall_s:.1f} s wall)")
    return metrics
