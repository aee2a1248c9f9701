"""The run configuration: Hydra schemas in, one frozen `RunConfig` out.

Each config group (conf/<group>/*.yaml) fills one node of the schema `Config`, so Hydra
type-checks every YAML value and command-line override when it composes. The schemas are
made from the frozen dataclasses the code uses (policy, traces, simulator, and the small
ones below), field for field: Hydra needs mutable nodes to merge into, the code wants
frozen values. `build` then constructs the frozen dataclasses, whose `__post_init__`
checks run: a bad value fails there with a message naming the field.
"""
import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from policy import CacheConfig, SchedulerConfig
from simulator import CostModelConfig, HardwareSpec
from traces import TraceConfig

MODES = ("sim", "gpu")
TASKS = ("replay", "calibrate")
LOGGERS = ("wandb", "none")
WANDB_MODES = ("offline", "online", "disabled")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """num_replicas: engine copies behind a router (simulator only, for now).
    router: how requests are spread over replicas (the simulator's names)."""
    num_replicas: int = 1
    router: str = "round_robin"

    def __post_init__(self):
        _require(isinstance(self.num_replicas, int) and self.num_replicas >= 1,
                 f"cluster.num_replicas must be an integer >= 1, got {self.num_replicas!r}")


@dataclass(frozen=True, slots=True)
class LoggerConfig:
    """kind: "wandb" or "none". mode: wandb's mode; "offline" writes under the run dir and
    needs no network or API key (`wandb sync` uploads later). group: wandb run group (None:
    the sweep's folder name in a multirun)."""
    kind: str = "wandb"
    mode: str = "offline"
    project: str = "twinserve"
    group: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self):
        _require(self.kind in LOGGERS, f"logger.kind must be one of {LOGGERS}, got {self.kind!r}")
        _require(self.mode in WANDB_MODES,
                 f"logger.mode must be one of {WANDB_MODES}, got {self.mode!r}")


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """GPU mode only: how the engine is built (see engine.EngineConfig).
    model_path: a local Hugging Face model directory; None = a randomly initialised
        checkpoint written from the `model` group's config.json (speed depends on the
        architecture, not the weights).
    device: "cuda"; "cpu" runs the same replay on the CPU (tiny models, tests).
    cuda_graph_max_tokens: the largest step (tokens) replayed from a CUDA graph (decode and
        mixed graphs: policy.cuda_graphs); the simulator pads steps by the same rule (0 with
        enforce_eager).
    async_scheduling: form step N+1 while step N runs (None: on); the simulator follows
        the same setting.
    skinny_gemm: the Triton skinny GEMM where measured faster at start (engine.EngineConfig).
    pdl_max_tokens: steps up to this many tokens launch their Triton kernels with
        programmatic dependent launch on sm_90+; 0 = never (engine.EngineConfig).
    kernel_plan: a file pinning the start-up kernel choices and the decode attention's
        split rule (engine.kernel_plan): read where it exists (a plan or a calibration),
        written where it does not; None: timed at start, the engine's own split rule.
    attention_streams: a mixed step's decode attention on a second stream beside its
        prefill attention (engine.EngineConfig; off by default)."""
    model_path: str | None = None
    dtype: str = "auto"
    device: str = "cuda"
    enforce_eager: bool = False
    cuda_graph_max_tokens: int = 8192
    tensor_parallel_size: int = 1
    attention_backend: str = "auto"
    async_scheduling: bool | None = None
    skinny_gemm: bool = True
    pdl_max_tokens: int = 32
    kernel_plan: str | None = None
    attention_streams: bool = False

    def __post_init__(self):
        _require(self.device in ("cuda", "cpu"),
                 f"engine.device must be 'cuda' or 'cpu', got {self.device!r}")
        _require(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1,
                 "engine.tensor_parallel_size must be an integer >= 1, "
                 f"got {self.tensor_parallel_size!r}")
        _require(isinstance(self.cuda_graph_max_tokens, int) and self.cuda_graph_max_tokens >= 0,
                 f"engine.cuda_graph_max_tokens must be an integer >= 0, got {self.cuda_graph_max_tokens!r}")
        _require(isinstance(self.pdl_max_tokens, int) and not isinstance(self.pdl_max_tokens, bool)
                 and self.pdl_max_tokens >= 0,
                 f"engine.pdl_max_tokens must be an integer >= 0 (0: never), got {self.pdl_max_tokens!r}")
        _require(self.kernel_plan is None or (isinstance(self.kernel_plan, str) and self.kernel_plan),
                 f"engine.kernel_plan must be a file path or null, got {self.kernel_plan!r}")

    @property
    def graph_limit(self) -> int:
        """The CUDA-graph size limit in effect (0: eager)."""
        return 0 if self.enforce_eager else self.cuda_graph_max_tokens

    @property
    def async_on(self) -> bool:
        return self.async_scheduling is not False


@dataclass(frozen=True, slots=True)
class SLOConfig:
    """Service-level objectives in ms (None = not checked); with any set, the summary
    gains request_goodput and slo_attainment."""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def __post_init__(self):
        for name in ("ttft_ms", "tpot_ms", "e2el_ms"):
            value = getattr(self, name)
            _require(value is None or value > 0, f"slo.{name} must be > 0 or null, got {value!r}")

    def as_dict(self) -> dict:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2el_ms": self.e2el_ms}


@dataclass(frozen=True, slots=True)
class CalibrateConfig:
    """task=calibrate (`python run.py experiment=calibrate`): profile the engine over a grid
    of step shapes and fit the simulator's cost models (experiments.calibrate).
    repeats: timed runs of each shape (after one warm-up run); the median is kept.
    out: the calibration JSON (None: simulator/calibrations/<model>-<hardware>-tp<tp>.json);
    the profile goes next to it (.profile.parquet) and the fitted roofline hardware
    parameters too (.hardware.yaml, unless fit_hardware is false). check_steps: a real
    run's steps.parquet (same engine settings): also print how the calibration predicts
    that run's own steps, by step kind (never fitted on). kv_layout: where the profiled
    shapes' KV blocks lie in the pool: "contiguous" (blocks 1, 2, 3, ... as a fresh pool
    hands them out, as the replays of a run have them) or "scattered" (a random permutation
    of the whole pool, a long-running server's after churn); on the H200 a decode step reads
    scattered blocks 0.6-0.9% slower (benchmarks/probe_transitions.py --stages layout).
    clock: also fit the clock term (simulator.clock, on the profile's launch timeline) and
    the kinds on base-clock times (a profile without a timeline gets no term). On by default
    since session 17: with random token ids it is what takes Llama-3.1-8B's fidelity table
    from 62 to 87 of 90 (simulator/calibrations/README.md).
    token_ids: the profiled steps' token ids, "random" (as serving's prompts; a mixture of
    experts always gets random ones, so its rows route as serving's do) or "zero" (every row
    of the activations alike, as every profile before session 15 had them): a GPU at its
    power limit may clock differently for them (benchmarks/probe_transitions.py --stages
    tokens). kv_cache_init: what the KV blocks the profiled shapes read hold (they are
    never written by a step of theirs): "written" (the default since session 18: before
    profiling, the model prefills prompts of random ids into them, as serving's decodes
    read what its prefills wrote), "random" (normal values, engine.EngineConfig.kv_cache_init)
    or "zeros" (the pool as allocated, as every profile before). On the H200 decode steps
    over zeros ran 1-4% faster than over random values, and Qwen3-0.6B's serving steps ran
    1.4% faster than a profile over random values priced them (benchmarks/README.md,
    session 18). block_cost_layout: where `--block-cost` (experiments.block_cost) lays the
    timed shapes' KV blocks, at every block size: "profiled" (as the calibration's profile
    did) or kv_layout's two; serving's blocks scatter as its pool churns."""
    repeats: int = 3
    out: str | None = None
    fit_hardware: bool = True
    check_steps: str | None = None
    kv_layout: str = "contiguous"
    clock: bool = True
    token_ids: str = "random"
    kv_cache_init: str = "written"
    block_cost_layout: str = "profiled"

    def __post_init__(self):
        _require(isinstance(self.repeats, int) and self.repeats >= 1,
                 f"calibrate.repeats must be an integer >= 1, got {self.repeats!r}")
        _require(self.kv_layout in ("contiguous", "scattered"),
                 f"calibrate.kv_layout must be contiguous or scattered, got {self.kv_layout!r}")
        _require(self.block_cost_layout in ("profiled", "contiguous", "scattered"),
                 f"calibrate.block_cost_layout must be profiled, contiguous or scattered, got "
                 f"{self.block_cost_layout!r}")
        _require(self.token_ids in ("zero", "random"),
                 f"calibrate.token_ids must be zero or random, got {self.token_ids!r}")
        _require(self.kv_cache_init in ("written", "random", "zeros"),
                 f"calibrate.kv_cache_init must be written, random or zeros, got {self.kv_cache_init!r}")


@dataclass(frozen=True, slots=True)
class RunConfig:
    """Everything one replay needs, validated."""
    mode: str
    seed: int
    progress: bool
    trace: TraceConfig
    model_name: str
    hf_config: dict
    hardware: HardwareSpec
    scheduler: SchedulerConfig
    cache: CacheConfig
    gpu_memory_utilization: float     # share of GPU memory for weights + activations + KV
    num_blocks: int | None            # KV pool size; None = derived from memory
    cost_model: CostModelConfig
    cluster: ClusterConfig
    logger: LoggerConfig
    engine: EngineSettings
    slo: SLOConfig
    task: str = "replay"
    calibrate: CalibrateConfig = CalibrateConfig()

    def __post_init__(self):
        _require(self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}")
        _require(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        _require(0 < self.gpu_memory_utilization <= 1,
                 "cache.gpu_memory_utilization must be in (0, 1], "
                 f"got {self.gpu_memory_utilization}")
        _require(self.num_blocks is None or self.num_blocks >= 1,
                 f"cache.num_blocks must be null (derived) or >= 1, got {self.num_blocks}")
        _require(self.mode == "sim" or self.cluster.num_replicas == 1,
                 f"mode=gpu runs one replica; got cluster.num_replicas={self.cluster.num_replicas}")
        _require("vocab_size" in self.hf_config,
                 f"model {self.model_name!r}: hf_config has no vocab_size")


# ---- Hydra schemas -----------------------------------------------------------------
def schema(cls, extra=()):
    """A mutable copy of dataclass `cls` for Hydra: same field names, types and defaults,
    plus `extra` (name, type, dataclasses.field) entries. Fields without a default are
    MISSING: the YAML must set them."""
    hints = typing.get_type_hints(cls)
    fields = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = field(default=f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = field(default_factory=f.default_factory)
        else:
            default = field(default=MISSING)
        fields.append((f.name, hints[f.name], default))
    return dataclasses.make_dataclass(f"{cls.__name__}Schema", fields + list(extra))


@dataclass
class ModelSchema:
    name: str = MISSING
    hf_config: dict[str, Any] = field(default_factory=dict)   # the model's config.json


TraceSchema = schema(TraceConfig)
HardwareSchema = schema(HardwareSpec)
SchedulerSchema = schema(SchedulerConfig)
CacheSchema = schema(CacheConfig, extra=[
    ("gpu_memory_utilization", float, field(default=0.9)),
    ("num_blocks", typing.Optional[int], field(default=None))])
CostModelSchema = schema(CostModelConfig)
ClusterSchema = schema(ClusterConfig)
LoggerSchema = schema(LoggerConfig)
EngineSchema = schema(EngineSettings)
SLOSchema = schema(SLOConfig)
CalibrateSchema = schema(CalibrateConfig)


@dataclass
class Config:
    """The whole composed config (conf/config.yaml)."""
    mode: str = "sim"
    task: str = "replay"
    seed: int = 0
    progress: bool = True
    trace: TraceSchema = field(default_factory=TraceSchema)
    model: ModelSchema = field(default_factory=ModelSchema)
    hardware: HardwareSchema = MISSING
    scheduler: SchedulerSchema = field(default_factory=SchedulerSchema)
    cache: CacheSchema = field(default_factory=CacheSchema)
    cost_model: CostModelSchema = field(default_factory=CostModelSchema)
    cluster: ClusterSchema = field(default_factory=ClusterSchema)
    logger: LoggerSchema = field(default_factory=LoggerSchema)
    engine: EngineSchema = field(default_factory=EngineSchema)
    slo: SLOSchema = field(default_factory=SLOSchema)
    calibrate: CalibrateSchema = field(default_factory=CalibrateSchema)


def recorded_config(config: dict, *overrides: dict) -> DictConfig:
    """A run's config as its summary.json records it (`config`), on this code's schema, with
    `overrides` merged over it. The results writer stores inf as null (JSON has neither inf
    nor NaN): a null in a float field that takes no None is inf again (a roofline_exponent of
    .inf, the max)."""
    def section(schema_type, values: dict) -> dict:
        types = {f.name: f.type for f in dataclasses.fields(schema_type)}
        return {k: math.inf if v is None and types.get(k) is float else v for k, v in values.items()}
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    restored = {k: section(sections[k], v) if isinstance(v, dict) and dataclasses.is_dataclass(sections.get(k))
                else v for k, v in config.items()}
    return OmegaConf.merge(OmegaConf.structured(Config), restored, *overrides)


def register_configs() -> None:
    """Store the schema as `schema` (conf/config.yaml lists it first in its defaults)."""
    ConfigStore.instance().store(name="schema", node=Config)


def build(cfg: DictConfig) -> RunConfig:
    """The frozen, validated run config of a composed Hydra config. Raises ValueError
    (a traces.TraceError for the trace) naming the bad field."""
    def plain(node) -> dict:
        return OmegaConf.to_container(node, resolve=True, throw_on_missing=True)

    if OmegaConf.is_missing(cfg.cost_model, "path"):
        CostModelConfig(kind=cfg.cost_model.kind, path=None)   # raises, saying what path it needs
    cache = plain(cfg.cache)
    gpu_memory_utilization = cache.pop("gpu_memory_utilization")
    num_blocks = cache.pop("num_blocks")
    return RunConfig(
        mode=cfg.mode, seed=cfg.seed, progress=cfg.progress,
        trace=TraceConfig(**plain(cfg.trace)),
        model_name=cfg.model.name, hf_config=plain(cfg.model.hf_config),
        hardware=HardwareSpec(**plain(cfg.hardware)),
        scheduler=SchedulerConfig(**plain(cfg.scheduler)),
        cache=CacheConfig(**cache),
        gpu_memory_utilization=gpu_memory_utilization, num_blocks=num_blocks,
        cost_model=CostModelConfig(**plain(cfg.cost_model)),
        cluster=ClusterConfig(**plain(cfg.cluster)),
        logger=LoggerConfig(**plain(cfg.logger)),
        engine=EngineSettings(**plain(cfg.engine)),
        slo=SLOConfig(**plain(cfg.slo)),
        task=cfg.task, calibrate=CalibrateConfig(**plain(cfg.calibrate)))
