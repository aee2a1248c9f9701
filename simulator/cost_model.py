"""How long one engine step takes: the simulator's only stand-in for the GPU.

A cost model answers two questions about a step (its `Batch.features()`, the counters of
a `steps.parquet` row): the device time (`predict`) and the host time of the step loop
around it (`host`: before the launch, after the tokens arrive). The simulator's step loop
(policy.step_loop, the engine's own) overlaps the two as the engine does.

- `RooflineCostModel`: peak rates x efficiencies from a `HardwareSpec`, work from a
  `ModelSpec`, CUDA-graph padding from policy.cuda_graphs. Any model on any GPU.
- `FittedCostModel`: fitted on a profile of the engine over a grid of step shapes
  (`python -m experiments.calibrate`), stored as a calibration file.
- `ReplayCostModel`: a real run's recorded steps, replayed at their recorded times (when
  each was formed, launched, received); with `strict` it checks that the simulator formed
  the same steps: the policy-equivalence check.
"""
import itertools
import json
import logging
import math
import pathlib
from abc import ABC, abstractmethod
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from policy.cuda_graphs import decode_sizes, graph_rows, mixed_sizes
from policy.decode_plan import RULE_FIELDS, DecodePlan
from policy.model import ModelConfig, expected_experts_touched
from simulator.clock import ClockTerm, IdleTerm
from simulator.hardware import HOST_WINDOWS, GiB, HardwareSpec, HostCosts, block_cost, check_block_cost

if TYPE_CHECKING:   # pandas only where a steps table is read: not on the simulator's path
    import pandas as pd

CALIBRATION_FORMAT = "twinserve-calibration/2"
STEP_KINDS = ("decode", "mixed", "eager")   # how the engine runs a step (policy.cuda_graphs)
REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
log = logging.getLogger(__name__)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


# ---- the model's shape ------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The numbers of a decoder-only transformer (dense or mixture of experts) that set its
    cost, named. Read from
    config.json by policy.model (the engine's own reading: the same defaults, the same
    refusals); `name` labels it (conf/model/<name>.yaml)."""
    name: str
    config: ModelConfig

    @classmethod
    def from_hf_config(cls, d: dict, name: str | None = None) -> "ModelSpec":
        """From a Hugging Face `config.json` dict (what `conf/model/<name>.yaml` holds under
        `hf_config`). Raises ValueError, naming the model, for what the engine cannot run."""
        name = name or d.get("_name_or_path") or d.get("model_type") or "model"
        try:
            return cls(name, ModelConfig.from_hf(d))
        except ValueError as e:
            raise ValueError(f"model {name!r}: {e}") from None

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def num_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def dtype_bytes(self) -> int:
        return self.config.dtype_bytes

    @property
    def matmul_params(self) -> int:
        """Linear-layer weights of all layers (no embedding, LM head or norms)."""
        return self.num_layers * self.config.layer_matmul_params

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        return self.config.num_params

    @property
    def matmul_weight_bytes(self) -> int:
        """Linear-layer weights of all layers in bytes (4-bit packed with group scales and
        zeros for a GPTQ / AWQ model)."""
        return self.num_layers * self.config.layer_matmul_bytes

    @property
    def weight_bytes(self) -> int:
        return self.config.weight_bytes

    def kv_bytes_per_token(self, tp: int = 1) -> int:
        """K and V of one token over all layers, on one rank."""
        return self.config.kv_cache_bytes_per_token(tp_size=tp)

    def check_tp(self, tp: int) -> None:
        try:
            self.config.check_tp(tp)
        except ValueError as e:
            raise ValueError(f"model {self.name!r}: tp={tp}: {e}") from None


def kv_pool_blocks(model: ModelSpec, hw: HardwareSpec, block_size: int,
                   gpu_memory_utilization: float, tp: int = 1,
                   activation_reserve_bytes: int = 2 * GiB) -> int:
    """KV blocks per GPU, sized as the engine does: (memory x utilization - weights/tp -
    activation reserve) / bytes per block, where a block is K and V of `block_size` tokens in
    every layer for this rank's KV heads. `activation_reserve_bytes` stands for the peak
    activation memory, CUDA context and graph pools the engine measures at start-up (the
    2 GiB default is a lead until the engine reports its measured value).
    Raises ValueError if nothing is left for the KV cache (the model does not fit)."""
    _require(0 < gpu_memory_utilization <= 1,
             f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    _require(isinstance(block_size, int) and block_size >= 1,
             f"block_size must be a positive integer, got {block_size!r}")
    model.check_tp(tp)
    budget = hw.memory_bytes * gpu_memory_utilization
    free = budget - model.weight_bytes / tp - activation_reserve_bytes
    block_bytes = block_size * model.kv_bytes_per_token(tp)
    blocks = int(free // block_bytes)
    _require(blocks >= 1,
             f"model {model.name!r} does not fit on {hw.name} with tp={tp}: "
             f"{budget / GiB:.1f} GiB usable (memory_gib={hw.memory_gib} x "
             f"gpu_memory_utilization={gpu_memory_utilization}) - weights "
             f"{model.weight_bytes / tp / GiB:.1f} GiB - activation reserve "
             f"{activation_reserve_bytes / GiB:.1f} GiB leaves {free / GiB:.2f} GiB, "
             f"less than one KV block ({block_bytes} bytes)")
    return blocks


# ---- CUDA graphs ------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class CudaGraphs:
    """The engine's CUDA-graph sizes (policy.cuda_graphs): decode graphs up to
    min(max_num_seqs, limit) sequences, mixed-step graphs up to min(max_num_batched_tokens,
    limit) tokens; limit = the engine's cuda_graph_max_tokens (0: eager, no graphs)."""
    decode: tuple = ()
    mixed: tuple = ()

    @classmethod
    def for_engine(cls, max_num_seqs: int, max_num_batched_tokens: int, limit: int) -> "CudaGraphs":
        if limit <= 0:
            return cls()
        return cls(tuple(decode_sizes(max_num_seqs, limit)),
                   tuple(mixed_sizes(max_num_batched_tokens, limit)))

    @classmethod
    def for_calibration(cls, engine: dict | None) -> "CudaGraphs":
        """The graphs of the engine settings a calibration file records (its "engine":
        max_num_seqs, max_num_batched_tokens, cuda_graph_max_tokens; absent keys: 256, 8192,
        0 as files made before they were recorded)."""
        e = engine or {}
        return cls.for_engine(e.get("max_num_seqs", 256), e.get("max_num_batched_tokens", 8192),
                              e.get("cuda_graph_max_tokens", 0))

    def rows(self, f: dict) -> tuple[str, int]:
        """("decode" | "mixed" | "eager", tokens the step computes, padding included)."""
        return graph_rows(f["num_batched_tokens"], f["num_seqs"], f["num_prefill_tokens"] == 0,
                          self.decode, self.mixed)


def profiled_block_size(calib: dict) -> int:
    """The KV block size a calibration's profile ran at: its engine.block_size, 16 (the
    engine's default) where the file does not record it, as for its other engine settings."""
    return (calib.get("engine") or {}).get("block_size", 16)


def profiled_kv_layout(calib: dict) -> str:
    """Where the profile's shapes' KV blocks lay ("contiguous" / "scattered"): its
    profiled.kv_layout, scattered in profiles made before it was recorded."""
    return (calib.get("profiled") or {}).get("kv_layout", "scattered")


# ---- cost models ------------------------------------------------------------------
class CostModel(ABC):
    """Device seconds of one engine step (`predict`) and the host costs around it (`host`).
    `decode_plan`: the split-KV decode plan whose `decode_span_tokens` `predict` reads (the
    simulator gives it to its schedulers, so every step's features have it), or None."""
    host: HostCosts = HostCosts()
    decode_plan: DecodePlan | None = None
    clock: ClockTerm | None = None      # the GPU clock's state (fitted models only)
    idle: IdleTerm | None = None        # the cost of a step after device idle (fitted models only)

    @abstractmethod
    def predict(self, features: dict) -> float:
        """Device time of a step, from `batch.features()`."""

    def step_time(self, batch) -> float:
        return self.predict(batch.features())

    def reset(self) -> None:
        """Forget per-run state (the simulator calls it at the start of every run)."""


class RooflineCostModel(CostModel):
    """A step is a sequence of kernel groups; each takes R(compute time, memory time), and
    the groups add up (they run one after another):

        linear   R(2 Gm T' / tp / F(T') + 2 Ge T' / tp / Fe,  Wr / tp / BW)   weights read once
        lm_head  R(2 V (h + K0) S / tp / F(S),  Pv b / tp / BW)   only if S > 0
        decode   R(A Cd / Fa,   K (Cu + r (Cd - Cu)) / BWa)   attention over each decode's KV
        prefill  R(A Pp / Fa,              K Ckv / BWa)       chunk attention incl. cached context
        allreduce  2 L (lat + 2 (tp-1)/tp T' h b / IC)        only if tp > 1
        fixed    step_fixed + L layer_fixed - L pdl_saving (if T' <= pdl_max_tokens)
                 + L layer_launch (if eager)

    R(c, m) = (c^p + m^p)^(1/p), p the hardware's roofline_exponent (infinity, the default:
    max(c, m), the ideal roofline; a finite p charges steps near the ridge point, where
    neither the tensor cores nor memory run at their rate, more).
    Gm: the dense GEMMs' sum of N (K + K0) over every layer's (layer_gemms: QKV, O, the MLP
    or a MoE layer's router), K0 the hardware's gemm_depth_overhead (an output tile's fixed
    work, in multiply-adds: 0 makes Gm the linear-layer params a token multiplies with),
    Ge: the same of a token's top-k experts, run at the expert GEMMs' FLOP/s Fe
    (expert_flops_efficiency; None: F, with Ge in Gm); Wr: the bytes a step reads of the
    weights (b Pm, Pm the linear-layer params a token multiplies with, for a dense model; 4-bit values with group scales and zeros for a quantized one, whose
    tensor cores still run Pm multiply-adds per token; with experts, every expert some token
    is routed to: policy.model.ModelConfig.matmul_weights_read of the step's T tokens x b),
    Pv: vocab x hidden (V x h), b: bytes per value, T': batched tokens
    padded to the step's CUDA graph (policy.cuda_graphs.graph_rows; unpadded if eager),
    F(T): the hardware's GEMM FLOP/s at T rows, S: sampled positions, A = 4 L heads
    head_dim / tp (FLOPs per query-key pair, QK^T and PV), Fa: the attention kernels'
    FLOP/s, K: KV bytes per token per rank,
    Cd: decode context tokens, Cu: of them, the tokens of distinct blocks (a block several
    decodes share, a prefix-cache hit, counted once), r: the hardware's shared_kv_read_cost
    (a shared block's reads after the first come mostly from L2; 1.0: no reuse), Pp: causal
    query-key pairs of prefill chunks, Ckv: their context after the step (cached prefix
    included), BWa: paged-attention bandwidth, L: layers, h: hidden, IC: interconnect
    bytes/s; pdl_max_tokens: the engine's (steps that small launch with programmatic
    dependent launch; 0: none). Host costs: the hardware's overheads.
    The decode and prefill attention terms are multiplied by the hardware's measured cost
    of the run's KV block size relative to the block its efficiencies describe
    (`HardwareSpec.attention_block_factor`; 1.0 without measurements or block_size=None).
    Which terms and efficiencies carry over between models was decided by fitting them on
    several models' profiles at once and predicting a model left out
    (simulator.hardware_fit; simulator/calibrations/README.md, "Error to expect").
    """

    def __init__(self, model: ModelSpec, hw: HardwareSpec, tp: int = 1,
                 graphs: CudaGraphs = CudaGraphs(), block_size: int | None = None,
                 pdl_max_tokens: int = 0):
        model.check_tp(tp)
        _require(tp == 1 or hw.interconnect_gbs > 0,
                 f"hardware {hw.name!r} has interconnect_gbs=0: cannot model tp={tp}")
        self.model, self.hw, self.tp, self.graphs = model, hw, tp, graphs
        self.host = hw.host_costs()
        BW, b = hw.bandwidth, model.dtype_bytes
        # Work per unit, precomputed so `predict` is a handful of multiplies.
        self.dense_gemms, self.expert_gemms = layer_gemms(model.config, tp)
        k0, top_k = hw.gemm_depth_overhead, model.config.num_experts_per_tok
        self.dense_flop = sum(2 * count * n * (k + k0) for count, n, k in self.dense_gemms)    # per token
        self.expert_flop = sum(2 * count * n * (k + k0) for count, n, k in self.expert_gemms) * top_k
        self.linear_flop = self.dense_flop + self.expert_flop                 # per token
        self.linear_bytes_s = model.matmul_weight_bytes / tp / BW      # per step
        self.lm_flop = 2 * model.vocab_size // tp * (model.hidden_size + k0)   # per sampled token
        self.lm_bytes_s = model.lm_head_params * b / tp / BW           # per step with a sample
        heads_per_rank = model.num_heads // tp
        self.attn_flop_s = 4 * model.num_layers * heads_per_rank * model.head_dim / hw.attention_flops
        self.kv_read_s = model.kv_bytes_per_token(tp) / hw.attention_bandwidth
        self.reread = hw.shared_kv_read_cost
        block = hw.attention_reference_block if block_size is None else block_size
        self.decode_attn_factor = hw.attention_block_factor("decode", block)
        self.prefill_attn_factor = hw.attention_block_factor("prefill", block)
        if tp > 1:
            self.allreduce_fixed_s = 2 * model.num_layers * hw.allreduce_latency_s
            self.allreduce_token_s = (2 * model.num_layers * 2 * (tp - 1) / tp
                                      * model.hidden_size * b / (hw.interconnect_gbs * 1e9))
        else:
            self.allreduce_fixed_s = self.allreduce_token_s = 0.0
        self.fixed_s = hw.step_fixed_s + hw.layer_fixed_s * model.num_layers
        self.eager_launch_s = hw.layer_launch_s * model.num_layers
        # steps of at most pdl_max_tokens rows launch each kernel while the one before ends
        self.pdl_max_tokens = pdl_max_tokens
        self.pdl_saving_s = hw.pdl_layer_saving_s * model.num_layers
        self._by_shape: dict[tuple, tuple] = {}   # step shape -> _shape_time's

    def predict(self, f: dict) -> float:
        # The fixed, linear and lm_head terms depend on the step's shape only: computed once
        # per shape (the same operations in the same order: the same float).
        shape = (f["num_batched_tokens"], f["num_seqs"], f["num_prefill_tokens"] == 0, f["num_sampled"])
        known = self._by_shape.get(shape)
        if known is None:
            known = self._by_shape[shape] = self._shape_time(f)
        t, kind, rows = known
        decode_ctx = kv = f["decode_context_tokens"]
        if self.reread != 1.0:
            distinct = f["decode_distinct_context_tokens"]
            kv = distinct + self.reread * (decode_ctx - distinct)
        roofline = self.hw.roofline
        t += self.decode_attn_factor * roofline(self.attn_flop_s * decode_ctx, self.kv_read_s * kv)
        if f["prefill_kv_tokens"]:
            t += self.prefill_attn_factor * roofline(self.attn_flop_s * f["prefill_attention_pairs"],
                                                     self.kv_read_s * f["prefill_kv_tokens"])
        if self.tp > 1:
            t += self.allreduce_fixed_s + self.allreduce_token_s * rows
        if kind == "eager":
            t += self.eager_launch_s
        return t

    def _shape_time(self, f: dict) -> tuple[float, str, int]:
        """(fixed + linear + lm_head seconds, graph kind, rows) of a step's shape."""
        hw = self.hw
        kind, rows = self.graphs.rows(f)
        linear_bytes_s = self.linear_bytes_s
        if self.model.config.is_moe:   # expert weights: only those the step's tokens touch
            routed = routed_tokens(f["num_batched_tokens"], rows)
            linear_bytes_s = (self.model.config.matmul_weights_read(routed)
                              * self.model.dtype_bytes / self.tp / hw.bandwidth)
        fixed = self.fixed_s - (self.pdl_saving_s if rows <= self.pdl_max_tokens else 0.0)
        t = fixed + hw.roofline(self._linear_compute_s(f, rows), linear_bytes_s)
        sampled = f["num_sampled"]
        if sampled:
            t += hw.roofline(self.lm_flop * sampled / hw.gemm_flops(sampled), self.lm_bytes_s)
        return t, kind, rows

    def _linear_compute_s(self, f: dict, rows: int) -> float:
        """Compute seconds of a step's linear layers: the dense GEMMs' FLOPs at the GEMM rate
        and a mixture of experts' grouped expert GEMMs at expert_flops_efficiency (None: the
        GEMM rate)."""
        hw = self.hw
        if not self.expert_flop or hw.expert_flops_efficiency is None:
            return self.linear_flop * rows / hw.gemm_flops(rows)
        return rows * (self.dense_flop / hw.gemm_flops(rows)
                       + self.expert_flop / (hw.peak_tflops * 1e12 * hw.expert_flops_efficiency))

    def reset(self) -> None:
        self._by_shape = {}


def layer_gemms(cfg: ModelConfig, tp: int = 1) -> tuple[list, list]:
    """The GEMMs of all layers on one rank, as (how many, N, K) with every token's row:
    (dense ones: QKV, O, the MLP's or the router; expert ones: each expert's gate_up and
    down, run for the rows routed to it). Column-parallel layers split N, row-parallel ones
    K, as the engine shards them."""
    h, q = cfg.hidden_size, cfg.q_size // tp
    kv = cfg.num_kv_heads_per_rank(tp) * cfg.head_dim
    layers, moe = cfg.num_hidden_layers, len(cfg.moe_layers)
    dense = [(layers, q + 2 * kv, h), (layers, h, q)]
    inter = cfg.intermediate_size // tp
    mlp = [(1, inter, h), (1, h, inter)] if cfg.norm == "layer" else [(1, 2 * inter, h), (1, h, inter)]
    dense += [(layers - moe, n, k) for _, n, k in mlp] if layers > moe else []
    experts = []
    if moe:
        dense.append((moe, cfg.num_experts, h))
        inter = cfg.moe_intermediate_size // tp
        experts = [(moe, 2 * inter, h), (moe, h, inter)]
    return dense, experts


# Attention and sampling work a fitted step time grows with, by step kind (Batch.features keys).
# max_context_tokens: a decode batch's attention ends with its longest sequence (the
# split-KV programs of the longest contexts set the step's tail).
# decode_distinct_context_tokens next to decode_context_tokens: decodes sharing KV blocks
# (prefix-cache hits) read each shared block once per sequence, but every read after the
# first mostly hits L2, so a step costs a x distinct + b x (total - distinct); written
# b x total + (a - b) x distinct, both coefficients >= 0 when a first read costs more.
# decode_span_tokens: the decode attention's longest chain of work under the engine's
# split-KV plan (policy.decode_plan): with contexts of unequal length, or shares rounding up
# past one wave of programs, the kernel takes longer than its summed context says.
# decode_split_seqs: the decodes that plan splits, each a merge of its partial outputs (the
# merge kernel's work; its programs for unsplit sequences return at once).
# decode_work_items: the plan's items (programs per KV head), each with fixed work (its
# query, its partial output, its merge ticket): while a batch's context grows, the plan adds
# items up to its target and the attention's cost rises faster than its KV; past the target
# it grows with the KV alone. Without it the fit, linear in context at each batch size, priced
# the middle of that curve low: Qwen3-0.6B on the H200, decode steps of 3-32 decodes of 1-4k
# tokens each (serving's) 2-6% low, on the profile's own shapes as on real runs.
# prefill_causal_pairs: of prefill_attention_pairs, those of each chunk with itself (the
# causal triangle, whose diagonal tiles are partly masked) as against those with the context
# before it (full tiles): a fit with both prices a pair behind a long prefix at its own rate
# instead of extrapolating the triangle's (CAUSAL_FEATURE, computed by the model itself).
# decode_reread_share_tokens: R x R / C, R the decodes' re-read tokens (decode_context_tokens C
# less decode_distinct_context_tokens): a re-read saves less the larger the re-read share of the
# step's KV, as the attention stops being bound by HBM reads (the longest chain, L2). Measured on
# the H200 (Qwen3-0.6B, 8-48 decodes of 1-4k tokens each): a re-read token saved 15-18 ns with
# 1/2 of the KV re-read, 8-11 ns with 7/8; a fit linear in R (11 ns everywhere) priced the
# profile's shapes re-reading 1/4 of their KV 2% high and those re-reading 7/8 0.5-3.4% low
# (TAPER_FEATURE, computed by the model itself; 0 without shared blocks).
# prefill_cached_pairs: of prefill_attention_pairs, those of each chunk with the cached context
# before it (CACHED_PAIRS_FEATURE: pairs less the causal ones), so a pair behind a prefix may
# cost more than one of the triangle as well as less (coefficients are >= 0).
# prefill_span_tokens: the prefill attention kernel's longest chain, in keys (PREFILL_SPAN_FEATURE:
# the larger of the longest chunk's context and the step's pairs over a fitted pairs-per-key D). The kernel
# runs one program per (KV head, query tile); a few tiles behind a long prefix all run at once and
# take as long as one tile's walk over the prefix, many tiles fill the GPU and take their total
# work. Measured on the H200 (Llama-3.1-8B profile, one chunk of n tokens behind s cached): the
# step cost 0.69-0.72 us more per cached token for n = 2..176 whatever n, then 1.6 us at n = 1024,
# 3.4-3.6 at 2048, 7.1 at 4096 (1.7 ns per pair); a fit linear in pairs and kv tokens priced
# such chunks behind 4-6k tokens 4-7% low at n <= 64 and at n >= 1k, 5-13% high at n = 200-500.
# prefill_other_cached_tokens: per prompt chunk of a step, the cached context of the OTHER
# chunks, averaged over the chunks ((chunks - 1) x the chunks' mean cached tokens): each chunk
# behind cached context costs more the more cached context the step's other chunks have.
# Measured on the H200 (Llama-3.1-8B, 1,881-shape profile): two or three chunks behind cached
# context were priced 3.4 / 5.2% short by every form without it, one chunk or chunks without
# cache within 0.7%; with it 0.9 / 1.1% (held-out mixed 1.82 -> 1.61%). Qwen3-0.6B's profile
# does not need it. Why the kernel pays it is not measured apart (a guess: a chunk's query
# tiles wait behind the other chunks' long walks over their prefixes). Its form in the number
# of chunks k: the profile holds k = 2 and 3 only, where the sum over chunks ((k - 1) x the
# cached tokens, session 11) and this mean fit alike (held-out mixed 1.61 / 1.62%); past
# them the sum grows as k^2 and the mean as k. On Llama's real mooncake_conv steps of four or
# more chunks behind cached context (session 12, never fitted on) the sum priced them
# 17-22% high, the mean 6-12%; the grid now profiles four and six such chunks to settle it.
# OTHER_CACHED_FEATURE, computed by the model. (Session 14: the real steps of several chunks
# behind cached context that ran 13-21% over their price, Qwen3-0.6B at a 2,048-token budget,
# held chunks of unequal context, a short chunk behind a 4k prefix beside a fresh one, which
# prefill_span_tokens took at the chunks' mean context; at the longest chunk's they are within
# 1-3%, and neither H200 profile of session 14 keeps this term.)
# num_sampled in a decode step: its real rows, against the padding rows of its CUDA graph
# (base(T') prices the graph's rows): a real row costs its sampling and its attention
# program's fixed work, a padding row neither. Without it Qwen3-0.6B's fit (session 19's
# padded grid) priced serving's decode steps with 8 or more padding rows +2.2..+2.5%
# (session 19's and 21's runs), with it +1.9..+2.3%, held-out 1.64 -> 1.62% (session 21).
FITTED_FEATURES = {
    "decode": ["num_sampled", "decode_context_tokens", "decode_distinct_context_tokens", "max_context_tokens",
               "decode_span_tokens", "decode_split_seqs", "decode_work_items", "decode_reread_share_tokens"],
    "mixed": ["num_sampled", "decode_context_tokens", "decode_distinct_context_tokens",
              "prefill_attention_pairs", "prefill_kv_tokens", "max_context_tokens",
              "decode_span_tokens", "decode_split_seqs", "decode_work_items", "prefill_causal_pairs",
              "decode_reread_share_tokens", "prefill_cached_pairs", "prefill_span_tokens",
              "prefill_other_cached_tokens"],
    "eager": ["num_sampled", "decode_context_tokens", "decode_distinct_context_tokens",
              "prefill_attention_pairs", "prefill_kv_tokens", "max_context_tokens",
              "decode_span_tokens", "decode_split_seqs", "decode_work_items", "prefill_causal_pairs",
              "decode_reread_share_tokens", "prefill_other_cached_tokens"],
}
CAUSAL_FEATURE = "prefill_causal_pairs"
TAPER_FEATURE = "decode_reread_share_tokens"
CACHED_PAIRS_FEATURE = "prefill_cached_pairs"
OTHER_CACHED_FEATURE = "prefill_other_cached_tokens"
PREFILL_SPAN_FEATURE = "prefill_span_tokens"
PREFILL_MAX_FEATURE = "prefill_max_context_tokens"   # a step record's column the span reads
SPAN_FEATURE = "decode_span_tokens"
SPLIT_FEATURE = "decode_split_seqs"
ITEMS_FEATURE = "decode_work_items"
PLAN_FEATURES = (SPAN_FEATURE, SPLIT_FEATURE, ITEMS_FEATURE)   # computed by the split-KV plan (DecodePlan.step_features)
# Which attention kernel's time each fitted feature measures (what a block size scales).
ATTENTION_FEATURES = {"decode_context_tokens": "decode", "decode_distinct_context_tokens": "decode",
                      "max_context_tokens": "decode", "decode_span_tokens": "decode",
                      "prefill_attention_pairs": "prefill", "prefill_kv_tokens": "prefill",
                      CAUSAL_FEATURE: "prefill", TAPER_FEATURE: "decode", CACHED_PAIRS_FEATURE: "prefill",
                      PREFILL_SPAN_FEATURE: "prefill", OTHER_CACHED_FEATURE: "prefill"}


def prefill_causal_pairs(f: dict) -> int:
    """CAUSAL_FEATURE of a step (its `Batch.features()` `f`): the sum over its prompt chunks
    of n (n + 1) / 2, n a chunk's tokens. Exact from the features: per chunk of n tokens after
    s computed ones, prefill_context_tokens adds n (s + n) and prefill_attention_pairs
    n s + n (n + 1) / 2, so context - pairs + tokens = sum of n (n + 1) / 2."""
    return f["prefill_context_tokens"] - f["prefill_attention_pairs"] + f["num_prefill_tokens"]


def prefill_cached_pairs(f: dict) -> int:
    """CACHED_PAIRS_FEATURE of a step: the query-key pairs of its prompt chunks with the context
    computed before each (sum of n x s, n a chunk's tokens, s its start): prefill_attention_pairs
    less prefill_causal_pairs."""
    return f["prefill_attention_pairs"] - prefill_causal_pairs(f)


def prefill_other_cached_tokens(f: dict) -> float:
    """OTHER_CACHED_FEATURE of a step: per prompt chunk, the cached context of the other chunks,
    averaged over its chunks: (chunks - 1) / chunks x (prefill_kv_tokens - num_prefill_tokens);
    0 with at most one chunk. Branch-free, so it works on a table's columns as on a step's
    features."""
    chunks = f["num_seqs"] - f["num_decode_seqs"]
    others = chunks - 1
    cached = f["prefill_kv_tokens"] - f["num_prefill_tokens"]
    return others * (others > 0) * (f["num_prefill_tokens"] > 0) * cached / (chunks + (chunks < 1))


def prefill_span_tokens(f: dict, pairs_per_key: float) -> float:
    """PREFILL_SPAN_FEATURE of a step: the prefill attention's longest chain of keys, the larger
    of its longest chunk's context (prefill_max_context_tokens: a chunk's few query tiles, all
    running at once, each walk its whole context) and its query-key pairs over `pairs_per_key`
    (the pairs the GPU works through while one program walks a key, once its tiles fill it);
    0 without a prompt chunk. A step recorded before prefill_max_context_tokens was (or a
    table without the column) takes its chunks' mean context, prefill_kv_tokens over them."""
    chunks = f["num_seqs"] - f["num_decode_seqs"]
    if not f["num_prefill_tokens"] or chunks <= 0:
        return 0.0
    longest = f.get(PREFILL_MAX_FEATURE) or f["prefill_kv_tokens"] / chunks
    return max(longest, f["prefill_attention_pairs"] / pairs_per_key)


def decode_reread_share_tokens(f: dict) -> float:
    """TAPER_FEATURE of a step (its `Batch.features()` `f`): R x R / C, where C is its decodes'
    KV tokens (decode_context_tokens) and R those re-read (C - decode_distinct_context_tokens:
    blocks another decode of the step reads too); 0 without decodes or shared blocks."""
    total = f["decode_context_tokens"]
    reread = total - f["decode_distinct_context_tokens"]
    return reread * reread / (total + (total < 1))      # branch-free: a step's features or a table's columns


# A re-read's saving, measured apart (a calibration's "reread"): the profile holds exact twins,
# decode shapes with the same contexts, one whose decodes share a prefix's blocks and one with
# nothing shared, so a twin pair's difference is what its re-reads save. On the H200 that saving
# per re-read token falls with the step's re-read share R / C: Qwen3-0.6B 18.2 ns at shares up to
# 20% (mooncake_conv's steps: one 512-token system block under 2-8k-token contexts), 15.3 at
# 20-35%, 10.3 at 35-60% and 10.2 above (decode twin pairs' medians); Llama-3.1-8B 16.3 / 16.3 /
# 10.8 / 10.4. One coefficient on decode_distinct_context_tokens (even with the taper above)
# fits the many high-share shapes: it priced the re-reads of mooncake_conv's real steps at
# 10.4 ns where they saved 19.5-22.5 (Qwen3-0.6B, session 13), those steps 1-3% high. So the
# fit prices every step as if nothing were shared and subtracts R x the twins' saving at its
# share (simulator.calibrate.reread_curve).
def reread_saving(f: dict, shares: list, saving_s: list) -> float:
    """The device seconds a step saves because its decodes re-read KV blocks another of its
    decodes reads: R x the saving per re-read token at its share R / C (C its decodes' KV
    tokens, R = C - decode_distinct_context_tokens), interpolated through (shares, saving_s)
    and flat past the ends. A step's features or a table's columns."""
    total = f["decode_context_tokens"]
    reread = total - f["decode_distinct_context_tokens"]
    share = reread / (total + (total < 1))
    if isinstance(share, np.ndarray) or hasattr(share, "to_numpy"):
        return reread * np.interp(share, shares, saving_s)
    # one step: np.interp on a scalar costs ~3.5 us, this ~0.9 (the simulator prices every step)
    if reread <= 0:
        return 0.0
    i = bisect_right(shares, share)
    if i == 0 or i == len(shares):
        return reread * saving_s[min(i, len(shares) - 1)]
    w = (share - shares[i - 1]) / (shares[i] - shares[i - 1])
    return reread * (saving_s[i - 1] + w * (saving_s[i] - saving_s[i - 1]))


# A feature that only refines another (fit_kind never keeps it without that one): the taper
# prices how a re-read's saving shrinks, meaningless without the re-read's saving itself (alone,
# its coefficient would make re-reads cost more than first reads).
FEATURE_NEEDS = {TAPER_FEATURE: "decode_distinct_context_tokens"}
# Features the fitted model computes from a step's features (a steps.parquet need not hold them).
COMPUTED_FEATURES = {CAUSAL_FEATURE: prefill_causal_pairs, TAPER_FEATURE: decode_reread_share_tokens,
                     CACHED_PAIRS_FEATURE: prefill_cached_pairs, OTHER_CACHED_FEATURE: prefill_other_cached_tokens}
# (PREFILL_SPAN_FEATURE too, with the calibration's "prefill_span": {"pairs_per_key"}: FittedCostModel)


# ---- mixture of experts: the experts a step reads ------------------------------------
# A MoE step reads, in every MoE layer, the weights of each expert some row is routed to.
# The fitted model's feature for it: the expected distinct experts per MoE layer (uniform
# routing, policy.model.expected_experts_touched) of the rows the engine routes. A CUDA
# graph's padding rows all hold token 0 at position 0 (engine.step_inputs), so they route
# as one more token. The calibration file names E and k ("moe"), so it predicts alone.
# The tokens of one prompt chunk need not route independently: they share their sequence's
# context, and a model may send most of them to the same experts. The file's
# `chunk_routing_exponent` a (fitted: `simulator.calibrate`) counts a chunk of n tokens as
# n^a independently routed tokens; a decode is one token of its own sequence. Measured on the
# H200 (Qwen3-30B-A3B, random weights drawn at load): a lone 384-token chunk ran 11.0 ms,
# the same chunk beside 16 decodes 17.5 ms, a batch of 16 decodes 11.5-13.4 ms; the held-out
# error of mixed steps is 10.1% at a = 1 (every token its own) and lowest, 2.9%, at a = 0
# (every chunk one routing unit); the fit keeps the largest a within one standard error of
# the best, 0.25 (3.0%).
MOE_FEATURE = "experts_touched"


def routed_tokens(num_tokens: int, rows: int) -> int:
    """Distinct tokens the router sees in a step of `num_tokens` tokens run as `rows` rows
    (its padding rows are identical: one more token)."""
    return num_tokens + (rows > num_tokens)


def step_experts_touched(num_experts: int, top_k: int, num_tokens: int, rows: int) -> float:
    """Expected distinct experts per MoE layer of a step whose every token routes on its own."""
    return expected_experts_touched(num_experts, top_k, routed_tokens(num_tokens, rows))


def routing_units(f: dict, rows: int, chunk_exponent: float = 1.0) -> float:
    """Independently routed tokens of a step (its `Batch.features()` `f`, run as `rows`
    rows): one per decode, n^chunk_exponent per prompt chunk of n tokens (a step's chunks
    taken as equal: the features carry their sum and count), one for the padding rows.
    chunk_exponent 1 is every token on its own (routed_tokens)."""
    prefill = f["num_prefill_tokens"]
    every_token = routed_tokens(f["num_batched_tokens"], rows)
    if not prefill or chunk_exponent == 1.0:
        return every_token
    chunks = max(1, f["num_seqs"] - f["num_decode_seqs"])
    return every_token - prefill + chunks * (prefill / chunks) ** chunk_exponent


def moe_experts_touched(num_experts: int, top_k: int, f: dict, rows: int,
                        chunk_exponent: float = 1.0) -> float:
    """The MOE_FEATURE of a step: expected distinct experts per MoE layer it reads, its
    routing units (routing_units) each sent uniformly to top_k of num_experts."""
    return expected_experts_touched(num_experts, top_k, routing_units(f, rows, chunk_exponent))


def hat_basis(x: np.ndarray, knots: list) -> np.ndarray:
    """Piecewise-linear interpolation weights of each x over `knots` (one column per knot);
    beyond the last knot the last segment extends (a single knot: proportional to x)."""
    knots = np.asarray(knots, float)
    x = np.asarray(x, float)
    out = np.zeros((len(x), len(knots)))
    if len(knots) == 1:
        out[:, 0] = x / knots[0]
        return out
    i = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, len(knots) - 2)
    w = (x - knots[i]) / (knots[i + 1] - knots[i])
    rows = np.arange(len(x))
    out[rows, i] = 1 - w
    out[rows, i + 1] = w
    return out


class FittedCostModel(CostModel):
    """Fitted on a profile of the engine (`python -m experiments.calibrate`). Per step kind
    (CUDA-graph decode, CUDA-graph mixed, eager: policy.cuda_graphs.graph_rows):

        device time = base(T') + sum(coefficient x feature)

    base: piecewise linear in the tokens T' the step computes (padding included), through
    the values fitted at `knots` (form "piecewise": every profiled size, for graphed steps
    the graph sizes; form "linear": the smallest and largest; `fit_kind` keeps the form
    with the lower held-out error);
    features: FITTED_FEATURES (attention and sampling work), each with a coefficient, or
    (`slopes`, variant " sloped") a coefficient piecewise linear in T' through its own
    knots. Host costs come from the file.
    Given the run's block size, each attention coefficient is scaled by cost(run's block) /
    cost(block profiled) of its kernel (ATTENTION_FEATURES; the calibration's own
    `attention_block_cost`, measured on the model's steps, else the hardware's): the profile
    measured attention at one block size.
    A step of a kind the profiled engine never ran (its graphs differ from the simulated
    engine's) is costed by the first fitted kind of eager, mixed, decode, at its tokens.
    A fit that uses decode_span_tokens, decode_split_seqs or decode_work_items (PLAN_FEATURES) needs the
    profiled engine's split-KV plan (`decode_plan`: KV heads per rank, SMs and the rule's
    constants, policy.decode_plan; the run's decode graphs add its padding rows): it
    becomes this model's `decode_plan`, so the simulator plans every step as the profiled
    engine did; `plan_features` lists the ones it prices.
    Mixture of experts: a kind may have a coefficient for MOE_FEATURE (seconds per expert
    read per MoE layer), computed from the step's features and rows with the file's
    "moe": {"num_experts", "top_k", "chunk_routing_exponent" (1.0 if absent)}
    (moe_experts_touched).
    A kind may price PREFILL_SPAN_FEATURE, computed with the file's "prefill_span":
    {"pairs_per_key": D} (prefill_span_tokens; D chosen by simulator.calibrate.fit_prefill_span).

        {"format": "twinserve-calibration/2", "model": "qwen3-0.6b", "device": "NVIDIA H200",
         "tp": 1, "engine_commit": "<sha>", "command": "<exact command>", "created": "<ISO>",
         "engine": {<the engine settings profiled>},
         "kinds": {"decode": {"knots": [...], "base_s": [...], "coefficients": {name: s/unit},
                              "slopes": {name: {"knots": [...], "coefficients": [s/unit at each]}} (optional),
                              "held_out": {"n", "mape", "p90_ape", "max_ape"}}, "mixed": ..., "eager": ...},
         "host": {"launch_s", "launch_seq_s", "launch_token_s" (per prompt token; 0 if absent),
                  "launch_prompt_s" (per step with a prompt chunk; 0 if absent),
                  "receive_s", "receive_seq_s"},
         "decode_plan": {"num_kv_heads": 8, "num_sms": 132, "split_slack": 1.25, ...}
                        (the split-KV plan the profiled engine ran: DecodePlan.describe()),
         "reread": {"shares": [...], "saving_s": [...]} (optional: the kinds were fitted on
                   steps as if unshared; a step with re-read KV costs its unshared price less
                   reread_saving),
         "attention_block_cost": {"decode": {block size: relative time}, "prefill": {...}}
                  (optional: experiments.block_cost's, at the profiled block size 1.0),
         "clock": {"tau_s", "slowdown": {"decode", "prompt"}, "flops": {...}} (optional: the
                  kinds were fitted on base-clock times; `clock`, a simulator.clock.ClockTerm,
                  and the simulator's executor turn each prediction into the step's time
                  under the GPU clock's state),
         "idle_cost": {"form", "idle_s": [...], "decode": [...], "prompt": [...]} (optional:
                  experiments.idle_cost's; `idle`, a simulator.clock.IdleTerm, that the
                  executor adds to a step by the device idle before it)}
    """

    def __init__(self, calibration: dict, source: str = "<calibration>",
                 graphs: CudaGraphs = CudaGraphs(), hw: HardwareSpec | None = None,
                 block_size: int | None = None, host_window: str = "auto"):
        _require(calibration.get("format") == CALIBRATION_FORMAT,
                 f"{source}: format is {calibration.get('format')!r}, expected {CALIBRATION_FORMAT!r} "
                 "(make one with `python -m experiments.calibrate`)")
        kinds = calibration.get("kinds") or {}
        self.calibration, self.source, self.graphs = calibration, source, graphs
        self.kinds = {}
        for kind, fit in kinds.items():
            _require(kind in STEP_KINDS, f"{source}: unknown step kind {kind!r} (known: {STEP_KINDS})")
            for key in ("knots", "base_s", "coefficients"):
                _require(key in fit, f"{source}: kind {kind!r} has no {key!r}")
            _require(len(fit["knots"]) == len(fit["base_s"]) >= 1,
                     f"{source}: kind {kind!r} needs as many base_s as knots (>= 1)")
            slopes = []     # (feature, knots, coefficient at each): a coefficient piecewise in rows
            for name, sl in (fit.get("slopes") or {}).items():
                _require(len(sl.get("knots", ())) == len(sl.get("coefficients", ())) >= 1,
                         f"{source}: kind {kind!r}: the slope of {name!r} needs as many "
                         "coefficients as knots (>= 1)")
                slopes.append((name, [float(k) for k in sl["knots"]], [float(c) for c in sl["coefficients"]]))
            self.kinds[kind] = ([float(k) for k in fit["knots"]], [float(b) for b in fit["base_s"]],
                                [(name, float(c)) for name, c in fit["coefficients"].items()], slopes)
        _require(self.kinds, f"{source}: no step kinds fitted")
        self.decode_plan = self._decode_plan(graphs)
        self.moe, self.moe_coef = self._moe_terms(calibration, source)
        self.computed = self._computed_features(calibration, source)
        self.chunk_exponent = self._chunk_exponent(calibration, source)
        self.reread = self._reread(calibration, source)
        self.host = HostCosts.from_calibration(calibration, host_window, source)
        self.attn_factors = self._block_factors(hw, block_size)
        self.clock = ClockTerm.from_calibration(calibration.get("clock"), source)
        self.idle = IdleTerm.from_calibration(calibration.get("idle_cost"), source)

        def factor(name):
            return self.attn_factors.get(ATTENTION_FEATURES.get(name), 1.0)
        for kind, (knots, base, terms, slopes) in self.kinds.items():
            terms = [(name, coef * factor(name)) for name, coef in terms]
            slopes = [(name, k, [c * factor(name) for c in cs]) for name, k, cs in slopes]
            self.kinds[kind] = (knots, base, terms, slopes)

    def _decode_plan(self, graphs: CudaGraphs) -> DecodePlan | None:
        """The profiled engine's split-KV plan with this run's decode graphs, if a fitted kind
        prices one of PLAN_FEATURES (None otherwise: the features need not carry them)."""
        priced = {name for _, _, terms, slopes in self.kinds.values()
                  for name in [n for n, _ in terms] + [n for n, _, _ in slopes]}
        self.plan_features = [f for f in PLAN_FEATURES if f in priced]
        if not self.plan_features:
            return None
        plan = self.calibration.get("decode_plan") or {}
        _require("num_kv_heads" in plan and "num_sms" in plan,
                 f"{self.source}: the fit prices {self.plan_features[0]} but the file has no decode_plan "
                 "{num_kv_heads, num_sms, ...} (the profiled engine's split-KV plan)")
        unknown = sorted(set(plan) - {"num_kv_heads", "num_sms", *RULE_FIELDS})
        _require(not unknown, f"{self.source}: decode_plan has unknown fields {unknown}")
        try:    # the rule's fields a file lacks are the engine's own
            return DecodePlan(decode_graph_sizes=tuple(graphs.decode), **plan)
        except ValueError as e:
            raise ValueError(f"{self.source}: {e}") from None

    def _moe_terms(self, calibration: dict, source: str) -> tuple[tuple[int, int] | None, dict]:
        """((num_experts, top_k) or None, {kind: MOE_FEATURE coefficient}): the MoE term,
        taken out of each kind's feature terms (predict computes its feature)."""
        coef = {}
        for kind, (knots, base, terms, slopes) in self.kinds.items():
            coef[kind] = sum(c for name, c in terms if name == MOE_FEATURE)
            self.kinds[kind] = (knots, base, [(n, c) for n, c in terms if n != MOE_FEATURE], slopes)
        moe = calibration.get("moe")
        if not any(coef.values()):
            return None, {}
        _require(isinstance(moe, dict) and moe.get("num_experts", 0) >= 1
                 and 1 <= moe.get("top_k", 0) <= moe["num_experts"],
                 f"{source}: a {MOE_FEATURE} coefficient needs \"moe\": {{\"num_experts\", "
                 f"\"top_k\"}} (1 <= top_k <= num_experts), got {moe!r}")
        return (int(moe["num_experts"]), int(moe["top_k"])), {k: c for k, c in coef.items() if c}

    def _computed_features(self, calibration: dict, source: str) -> dict:
        """COMPUTED_FEATURES, with PREFILL_SPAN_FEATURE at the file's prefill_span.pairs_per_key
        where a kind prices it."""
        priced = {name for _, _, terms, _ in self.kinds.values() for name, _ in terms}
        if PREFILL_SPAN_FEATURE not in priced:
            return COMPUTED_FEATURES
        d = (calibration.get("prefill_span") or {}).get("pairs_per_key")
        _require(isinstance(d, (int, float)) and not isinstance(d, bool) and d > 0,
                 f"{source}: a {PREFILL_SPAN_FEATURE} coefficient needs \"prefill_span\": "
                 f"{{\"pairs_per_key\": a number > 0}}, got {calibration.get('prefill_span')!r}")
        return {**COMPUTED_FEATURES, PREFILL_SPAN_FEATURE: lambda f: prefill_span_tokens(f, d)}

    @staticmethod
    def _chunk_exponent(calibration: dict, source: str) -> float:
        """The file's moe.chunk_routing_exponent (1.0, every token routed on its own, if absent)."""
        a = (calibration.get("moe") or {}).get("chunk_routing_exponent", 1.0)
        _require(isinstance(a, (int, float)) and not isinstance(a, bool) and 0 <= a <= 1,
                 f"{source}: moe.chunk_routing_exponent must be a number in [0, 1], got {a!r}")
        return float(a)

    @staticmethod
    def _reread(calibration: dict, source: str) -> tuple[list, list] | None:
        """The file's reread curve (shares, saving_s), or None: the kinds price re-reads
        themselves (decode_distinct_context_tokens), as files made before it do."""
        curve = calibration.get("reread")
        if curve is None:
            return None
        shares, saving = (curve or {}).get("shares"), (curve or {}).get("saving_s")
        ok = (isinstance(shares, list) and isinstance(saving, list) and len(shares) == len(saving) >= 1
              and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in shares + saving)
              and all(0 <= a < b <= 1 for a, b in zip(shares, shares[1:])) and 0 <= shares[0] <= 1
              and all(x >= 0 for x in saving))
        _require(ok, f"{source}: reread must be {{\"shares\": increasing numbers in [0, 1], \"saving_s\": "
                     f"as many numbers >= 0}}, got {curve!r}")
        return [float(x) for x in shares], [float(x) for x in saving]

    def _block_factors(self, hw: HardwareSpec | None, block_size: int | None) -> dict:
        """{"decode": f, "prefill": f}: the run's block size against the profiled one
        (the calibration's engine.block_size; 16, the engine's default, if not recorded,
        as for its other engine settings), from the calibration's own attention_block_cost
        where it has one (measured on the model's steps: experiments.block_cost), else the
        hardware's (the attention kernel alone: bench_attention.py --stages blocks)."""
        own = self.calibration.get("attention_block_cost")
        tables = (check_block_cost(own, self.source) if own is not None
                  else hw.attention_block_cost if hw is not None else {})
        if block_size is None or not tables:
            return {}
        profiled = profiled_block_size(self.calibration)
        _require(isinstance(profiled, int) and profiled >= 1,
                 f"{self.source}: engine.block_size must be an integer >= 1, got {profiled!r}")
        return {kernel: block_cost(table, block_size) / block_cost(table, profiled)
                for kernel, table in tables.items()}

    @classmethod
    def load(cls, path, graphs: CudaGraphs = CudaGraphs(), hw: HardwareSpec | None = None,
             block_size: int | None = None, host_window: str = "auto") -> "FittedCostModel":
        path = pathlib.Path(path)
        with open(path) as f:
            return cls(json.load(f), source=str(path), graphs=graphs, hw=hw, block_size=block_size,
                       host_window=host_window)

    def predict(self, f: dict) -> float:
        kind, rows = self.graphs.rows(f)
        if kind not in self.kinds:   # a step the profiled engine never ran this way
            kind = next(k for k in ("eager", "mixed", "decode") if k in self.kinds)
            rows = f["num_batched_tokens"]
        knots, base, terms, slopes = self.kinds[kind]
        t = base_time(knots, base, rows)
        if self.reread and f.get("decode_distinct_context_tokens", f["decode_context_tokens"]) < f["decode_context_tokens"]:
            # priced as if nothing were shared, less what the twins measured re-reads to save
            # (decode attention's time, so scaled by the block size as its other terms are)
            t -= reread_saving(f, *self.reread) * self.attn_factors.get("decode", 1.0)
            f = {**f, "decode_distinct_context_tokens": f["decode_context_tokens"]}
        for name, coef in terms:
            t += coef * (f[name] if name not in self.computed else self.computed[name](f))
        for name, k, coefs in slopes:     # a coefficient piecewise linear in rows
            t += base_time(k, coefs, rows) * f[name]
        if self.moe_coef and kind in self.moe_coef:
            t += self.moe_coef[kind] * moe_experts_touched(*self.moe, f, rows, self.chunk_exponent)
        return t


def base_time(knots: list, base: list, x: float) -> float:
    """Piecewise-linear interpolation through (knots, base), the ends extended linearly."""
    if len(knots) == 1:
        return base[0] * x / knots[0]
    i = min(max(bisect_right(knots, x) - 1, 0), len(knots) - 2)
    w = (x - knots[i]) / (knots[i + 1] - knots[i])
    return base[i] + w * (base[i + 1] - base[i])


def nonnegative_lstsq(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient >= 0: solve, drop the most negative column,
    solve again, until none is negative. A greedy active-set method: always non-negative,
    and the exact NNLS optimum in the usual case of a few useless features dropping out."""
    active = list(range(X.shape[1]))
    coef = np.zeros(X.shape[1])
    while active:
        scale = np.abs(X[:, active]).max(axis=0)
        scale[scale == 0] = 1.0          # conditioning: features span 1 .. 1e9
        sol = np.linalg.lstsq(X[:, active] / scale, y, rcond=None)[0] / scale
        if (sol >= 0).all():
            coef[active] = sol
            break
        del active[int(np.argmin(sol))]
    return coef


TIE_MAPE = 1e-7   # held-out errors closer than this are equal when a fit's variant is chosen


def fit_kind(train: "pd.DataFrame", test: "pd.DataFrame", features: list[str],
             optional: tuple[str, ...] = (), sloped: tuple[str, ...] = (),
             earn: tuple[str, ...] = ()) -> dict:
    """One step kind, its form and features chosen by measurement: the base is fitted either
    piecewise linear through every distinct computed-token count of `train` ("piecewise":
    each CUDA graph size its own cost) or linear between the smallest and largest
    ("linear"), with non-negative feature coefficients, by least squares on relative error
    (each row weighted 1 / its time, so small steps count as much as large ones); each
    `optional` feature is tried in and out (out only where that beats the best fit with every
    feature by more than its standard error), and each non-empty subset of the `sloped`
    features with a coefficient that is itself piecewise linear in the step's rows, through
    4 of its sizes spaced geometrically (" sloped <features>", or " sloped" when only one
    feature can be: attention's cost per token of KV, and per token of the split-KV plan's
    longest chain, depends on the batch, through how the kernel's programs cover the GPU).
    The variant with the lower error on `test`
    (shapes not fitted on; `train` if there are none) is kept (ties: piecewise, fewer
    slopes, more features); `variant` names it and `forms` records every variant's error.
    A feature of `earn` is searched apart: the variants above without it, then all of them
    again with it (" with <feature>"); those with it are kept only if their best, on the held-out
    shapes where the feature is not 0 (the only ones it can change), beats the best without by
    more than that one's standard error there, and is no worse on the kind's held-out shapes as a
    whole: a new term must pay for itself beyond the noise of the shapes it prices, so a profile
    that cannot tell keeps the fit it had without it. (Judged on the whole kind, a term that
    prices a quarter of the shapes is diluted four times by shapes it cannot move.)"""
    sizes = sorted(set(train["rows"].astype(int)))
    candidates = {"piecewise": sizes, "linear": [sizes[0], sizes[-1]] if len(sizes) > 1 else sizes}
    sloped = [f for f in sloped if f in features]
    slopes = {"": ()}       # label -> the features whose coefficient is sloped
    if sloped and len(sizes) >= 4:
        slope_knots = sorted({min(sizes, key=lambda s: abs(math.log(s / x)))
                              for x in np.geomspace(sizes[0], sizes[-1], 4)})
        for n in range(1, len(sloped) + 1):
            for subset in itertools.combinations(sloped, n):
                label = " sloped" if len(sloped) == 1 else " sloped " + "+".join(subset)
                slopes[label] = subset

    def variants(features: list[str], suffix: str) -> dict:
        feature_sets = {"": features}
        for f in optional:
            if f in features and f not in earn:   # (a feature refining another leaves with it: FEATURE_NEEDS)
                feature_sets[f" without {f}"] = [x for x in features if x != f and FEATURE_NEEDS.get(x) != f]
        return {form + label + sl + suffix: (form, _fit_base(train, test, fs, knots,
                                                             slopes={f: slope_knots for f in subset if f in fs},
                                                             keep_ape=True))
                for form, knots in candidates.items() for label, fs in feature_sets.items()
                for sl, subset in slopes.items()}

    def held(fit):
        return fit.get("held_out", fit["train"])

    def lowest(fits: dict) -> str:
        # errors within TIE_MAPE of the lowest tie (a noise-free profile fits several exactly)
        low = min(held(fit)["mape"] for _, fit in fits.values())
        tied = [k for k, (_, fit) in fits.items() if held(fit)["mape"] <= low + TIE_MAPE]
        return min(tied, key=lambda k: (fits[k][0] != "piecewise", "sloped" in k, len(k)))

    def choose(fits: dict) -> str:
        # a feature leaves only if the fit without it beats the best fit with every feature by
        # more than that one's standard error: else held-out noise would flip it in and out
        # between two profiles of one engine, and move what it prices where the grid is thin
        # (Llama-3.1-8B on the H200: two profiles 0.1% apart flipped max_context_tokens, and
        # the fit without it priced the replayed ShareGPT decode steps 1.5-2% lower)
        best = lowest(fits)
        full = {k: v for k, v in fits.items() if " without " not in k}
        if " without " in best and full:
            keep = lowest(full)
            if held(fits[best][1])["mape"] >= held(full[keep][1])["mape"] - held(full[keep][1])["se"]:
                return keep
        return best

    def pays(challenger: dict, incumbent: dict, touched: np.ndarray) -> bool:
        if not touched.any():            # no held-out shape it prices: nothing to judge it on
            return False
        new, old = held(challenger)["ape"][touched], held(incumbent)["ape"][touched]
        return (new.mean() < old.mean() - old.std() / math.sqrt(len(old))
                and held(challenger)["mape"] <= held(incumbent)["mape"])
    base = [f for f in features if f not in earn]
    fits = variants(base, "")
    best = choose(fits)
    judged = test if len(test) else train
    for f in (f for f in earn if f in features):
        more = variants(base + [f], f" with {f}")
        fits.update(more)
        challenger = choose(more)
        if pays(more[challenger][1], fits[best][1], judged[f].to_numpy(float) != 0):
            best = challenger
    form, fit = fits[best]
    fit = {**fit, **{k: {x: y for x, y in fit[k].items() if x != "ape"} for k in ("train", "held_out") if k in fit}}
    return {**fit, "form": form, "variant": best, "forms": {k: held(v)["mape"] for k, (_, v) in fits.items()}}


def _fit_base(train, test, features: list[str], knots: list[int], slopes: dict | None = None,
              keep_ape: bool = False) -> dict:
    """`slopes`: {feature: knots}: those features' coefficients piecewise linear in rows.
    `keep_ape`: each error summary also holds its rows' errors ("ape", an array: not JSON)."""
    slopes = slopes or {}
    flat = [f for f in features if f not in slopes]
    def design(df):
        rows = df["rows"].to_numpy(float)
        return np.column_stack([hat_basis(rows, knots)] + [df[f].to_numpy(float) for f in flat]
                               + [hat_basis(rows, k) * df[f].to_numpy(float)[:, None]
                                  for f, k in slopes.items()])
    y = train["device_s"].to_numpy(float)
    coef = nonnegative_lstsq(design(train) / y[:, None], np.ones_like(y))
    base, terms = coef[:len(knots)], coef[len(knots):len(knots) + len(flat)]
    fit = {"knots": [int(k) for k in knots], "base_s": [float(b) for b in base],
           "coefficients": {f: float(c) for f, c in zip(flat, terms)}}
    at = len(knots) + len(flat)
    if slopes:
        fit["slopes"] = {}
        for f, k in slopes.items():
            fit["slopes"][f] = {"knots": [int(x) for x in k], "coefficients": [float(c) for c in coef[at:at + len(k)]]}
            at += len(k)
    for name, df in (("train", train), ("held_out", test)):
        if len(df):
            pred = design(df) @ coef
            ape = np.abs(pred - df["device_s"].to_numpy(float)) / df["device_s"].to_numpy(float)
            fit[name] = {"n": int(len(df)), "mape": float(ape.mean()),
                         "p90_ape": float(np.percentile(ape, 90)), "max_ape": float(ape.max()),
                         "se": float(ape.std() / math.sqrt(len(ape))),   # the MAPE's standard error
                         **({"ape": ape} if keep_ape else {})}   # per row: fit_kind judges `earn` terms on theirs
    return fit


class ReplayCostModel(CostModel):
    """A recorded run (`steps.parquet` of one engine or simulator replica), replayed step
    by step at its recorded times: each step is formed at its `start_s`, launched at
    `launch_s`, its tokens arrive at `tokens_s`, its step() returns at `end_s`. With
    `strict`, the simulator's step i must have the recorded composition (`SHAPE` columns):
    a mismatch means the policies diverged, and raises RuntimeError naming the step."""
    TIMES = ("start_s", "launch_s", "tokens_s", "end_s")
    SHAPE = ("num_seqs", "num_batched_tokens", "num_prefill_tokens", "num_decode_seqs",
             "num_sampled", "decode_context_tokens", "decode_distinct_context_tokens",
             "prefill_context_tokens", "num_preempted",
             "prefix_hit_tokens", "kv_blocks_used")

    def __init__(self, steps: "pd.DataFrame", strict: bool = True, source: str = "<steps>"):
        missing = [c for c in self.TIMES if c not in steps.columns]
        _require(not missing, f"{source}: replay needs the step times {missing} (steps "
                 "recorded before the step loop logged them: run the engine again)")
        if "replica" in steps.columns:
            _require(steps["replica"].nunique() <= 1,
                     f"{source}: replay takes one replica's steps, found replicas "
                     f"{sorted(steps['replica'].unique())}")
        if "step" in steps.columns:
            steps = steps.sort_values("step", kind="stable")
        self.shape = [c for c in self.SHAPE if c in steps.columns] if strict else []
        cols = list(self.TIMES) + self.shape + [c for c in ("device_s",) if c in steps.columns]
        self.records = steps[cols].to_dict("records")
        self.strict, self.source, self.next_step = strict, source, 0

    @classmethod
    def load(cls, path, strict: bool = True) -> "ReplayCostModel":
        import pandas as pd
        return cls(pd.read_parquet(path), strict=strict, source=str(path))

    def reset(self) -> None:
        self.next_step = 0

    def predict(self, f: dict) -> float:
        """The device time recorded for the step being replayed (NaN if not recorded)."""
        i = max(self.next_step - 1, 0)
        return float(self.records[i].get("device_s", math.nan)) if self.records else math.nan

    def take(self, earliest: float) -> dict:
        """The next recorded step, which the simulator is about to form (not before
        `earliest`, the simulated time it has reached)."""
        i = self.next_step
        if i >= len(self.records):
            raise RuntimeError(f"replay: the simulator formed step {i} but {self.source} "
                               f"records only {len(self.records)} steps (the schedules diverged "
                               "or the workloads differ)")
        record = self.records[i]
        if record["start_s"] < earliest:
            raise RuntimeError(f"replay: schedules diverged at step {i}: {self.source} formed "
                               f"it at t={record['start_s']:.6f}s, when the simulator was still busy "
                               f"until t={earliest:.6f}s (or idle: it had no work then)")
        self.next_step = i + 1
        return record

    def check(self, i: int, made: dict | None) -> None:
        """Compare the simulator's step `i` (its record, None if it formed nothing) with the
        recorded one."""
        if not self.strict:
            return
        want = self.records[i]
        if made is None:
            raise RuntimeError(f"replay: schedules diverged at step {i}: the simulator formed "
                               f"an empty step; {self.source} recorded "
                               + ", ".join(f"{c}={want[c]}" for c in self.shape))
        diff = [c for c in self.shape if made[c] != want[c]]
        if diff:
            raise RuntimeError(
                f"replay: schedules diverged at step {i}: the simulator formed "
                + ", ".join(f"{c}={made[c]}" for c in diff) + f"; {self.source} recorded "
                + ", ".join(f"{c}={want[c]}" for c in diff))

    def check_done(self) -> None:
        if self.strict and self.next_step != len(self.records):
            raise RuntimeError(f"replay: the simulator finished after {self.next_step} steps; "
                               f"{self.source} records {len(self.records)} (the schedules diverged)")


# ---- configuration ----------------------------------------------------------------
COST_MODELS = ("roofline", "fitted", "replay")


@dataclass(frozen=True, slots=True)
class CostModelConfig:
    """kind: roofline | fitted | replay. path: the calibration JSON (fitted; made by
    `python -m experiments.calibrate`) or a run's steps.parquet (replay); relative paths
    are tried from the working directory, then from the repository root. strict: replay
    checks every step's composition. host_window (fitted): which of the calibration's host
    measurements the simulator charges (simulator.hardware.HOST_WINDOWS: "profile", the
    runner's launches; "serving", the engine's own step loop, admissions included; "auto",
    "serving" where the file measured it, else "profile"). clock (fitted): apply the
    calibration's clock term (simulator.clock) where it has one; false prices every step at
    the base clock. idle (fitted): add the calibration's idle cost (simulator.clock.IdleTerm,
    experiments.idle_cost) to a step after device idle where it has one."""
    kind: str = "roofline"
    path: str | None = None
    strict: bool = True
    host_window: str = "auto"
    clock: bool = True
    idle: bool = True

    def __post_init__(self):
        _require(self.kind in COST_MODELS,
                 f"cost_model.kind must be one of {COST_MODELS}, got {self.kind!r}")
        _require(self.kind == "roofline" or bool(self.path),
                 f"cost_model.kind={self.kind!r} needs cost_model.path"
                 + (" (a calibration JSON from `python -m experiments.calibrate`; see "
                    "simulator/calibrations/README.md)" if self.kind == "fitted" else
                    " (a run's steps.parquet)"))
        _require(self.host_window in HOST_WINDOWS,
                 f"cost_model.host_window must be one of {HOST_WINDOWS}, got {self.host_window!r}")


def _resolve(path: str) -> pathlib.Path:
    for candidate in (pathlib.Path(path), REPO_ROOT / path):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"cost_model.path {path!r} not found (tried the working directory "
                            f"and {REPO_ROOT})")


def _same_model(a: str, b: str) -> bool:
    return a.rsplit("/", 1)[-1].lower() == b.rsplit("/", 1)[-1].lower()


def build_cost_model(cfg: CostModelConfig, model: ModelSpec, hw: HardwareSpec, tp: int = 1,
                     graphs: CudaGraphs = CudaGraphs(), block_size: int | None = None,
                     pdl_max_tokens: int = 0) -> CostModel:
    """The cost model `cfg` names. A calibration must be for this model and tp. `block_size`:
    the run's KV block size, whose attention speed the hardware's `attention_block_cost`
    states (None: the block size the costs were measured at); one outside a kernel's
    measured sizes is logged (it takes the nearest measured size's cost). `pdl_max_tokens`:
    the engine's (the roofline's `pdl_layer_saving_s` applies to steps of at most that many
    rows)."""
    for kernel, table in hw.attention_block_cost.items():
        if block_size is not None and cfg.kind != "replay" and not min(table) <= block_size <= max(table):
            nearest = min(table) if block_size < min(table) else max(table)
            log.warning(f"hardware {hw.name!r}: attention_block_cost.{kernel} was measured at block sizes "
                        f"{min(table)}-{max(table)}; block {block_size} takes block {nearest}'s cost")
    if cfg.kind == "roofline":
        return RooflineCostModel(model, hw, tp, graphs, block_size, pdl_max_tokens)
    path = _resolve(cfg.path)
    if cfg.kind == "replay":
        return ReplayCostModel.load(path, strict=cfg.strict)
    fitted = FittedCostModel.load(path, graphs, hw, block_size, cfg.host_window)
    if not cfg.clock:
        fitted.clock = None
    if not cfg.idle:
        fitted.idle = None
    calib = fitted.calibration
    _require(_same_model(str(calib.get("model", "")), model.name),
             f"{path}: calibrated for model {calib.get('model')!r}, not {model.name!r}")
    _require(int(calib.get("tp", 1)) == tp, f"{path}: calibrated for tp={calib.get('tp')}, not tp={tp}")
    return fitted
