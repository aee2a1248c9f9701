"""What the cost model knows about a GPU: peak rates, how much of them a real kernel gets,
memory, the interconnect, and the CPU-side costs of one engine step.

`conf/hardware/<name>.yaml` holds exactly these fields (`HardwareSpec(**yaml)`).
"""
import math
from dataclasses import dataclass
from typing import Any

GiB = 1 << 30
# The attention kernels whose speed by KV block size a hardware file may state
# (`attention_block_cost`): the split-KV decode kernel and the prefill kernel (prompt chunks,
# the prefill half of a mixed step).
ATTENTION_KERNELS = ("decode", "prefill")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    """One GPU and the engine's fixed costs on it. Rates are datasheet peaks; the
    efficiency factors turn them into what the engine's kernels achieve. The efficiencies
    and overheads are what `python -m experiments.calibrate` fits from a profile of the
    engine (it writes them as a hardware file); the shipped values without such a fit
    are leads, said so in each file.

    peak_tflops: dense bf16 tensor-core TFLOP/s (no sparsity).
    hbm_bandwidth_gbs: memory bandwidth, GB/s (1e9 bytes/s).
    memory_gib: device memory the engine sizes its KV pool from, GiB.
    flops_efficiency: achieved / peak for large GEMMs (0 < x <= 1).
    flops_half_tokens: GEMM tokens at which a GEMM reaches half of `flops_efficiency`
        (small GEMMs are latency-bound): efficiency(T) = flops_efficiency * T / (T + this).
    gemm_depth_overhead: K0 of a GEMM's fixed work per output, in multiply-adds: a GEMM of
        depth K costs as if it were K + K0 deep (each output tile fills the load pipeline
        and writes its results once, whatever K), so a narrow model's GEMMs (K of 1-3k)
        run at a smaller share of the rate than a wide one's (4-14k): efficiency(K) =
        flops_efficiency * K / (K + K0).
    attention_flops_efficiency: achieved / peak of the attention kernels' tensor-core work
        (query-key pairs); None: flops_efficiency.
    expert_flops_efficiency: achieved / peak of a mixture of experts' grouped expert GEMMs
        (the engine's Triton kernel: 16-64 pair rows x 64 columns per tile, far below the
        dense GEMMs' rate), K0 included; None: the dense GEMMs' rate.
    bandwidth_efficiency: achieved / peak for streaming weight reads (0 < x <= 1).
    attention_bandwidth_efficiency: achieved / peak for paged-attention KV reads.
    interconnect_gbs: per-GPU, per-direction bandwidth seen by a tensor-parallel all-reduce.
    allreduce_latency_s: fixed cost of one all-reduce (launch + synchronisation).
    step_fixed_s: device time every step pays whatever its size (sampling, small kernels).
    layer_fixed_s: device time per decoder layer and step (the minimum of its kernels).
    pdl_layer_saving_s: what a step of at most the engine's `pdl_max_tokens` rows saves of
        `layer_fixed_s` per layer (programmatic dependent launch: each kernel starts while
        the one before it ends); the roofline subtracts it only when told the engine's
        pdl_max_tokens.
    roofline_exponent: p of how a kernel group's compute time c and memory time m combine,
        (c^p + m^p)^(1/p): infinity is the ideal roofline max(c, m); a finite p charges the
        shapes near the ridge point, where neither unit runs at its rate, more.
    layer_launch_s: extra per-layer cost of a step run eagerly (kernel launches the device
        waits for); a step replayed from a CUDA graph does not pay it.
    step_overhead_s, seq_overhead_s, prefill_token_overhead_s, prefill_step_overhead_s: host
        time to form, pack and launch a step: fixed, per scheduled sequence, per prompt token
        it computes, and once more for a step that carries a prompt chunk at all.
    update_overhead_s, update_seq_overhead_s: host time after a step's tokens arrive
        (receive them, update the policy): fixed, and per scheduled sequence.
    admit_overhead_s, admit_token_overhead_s: host time to admit a request that arrived
        since the step before (the engine's add_request, inside the window of the step
        formed next): per request, and per prompt token of it.
    Host time runs concurrently with the device under asynchronous scheduling; the
    simulator's step loop (policy.step_loop) charges what the device does not hide.
    attention_block_cost: how the paged-attention kernels' time depends on the KV block
        size: {"decode": {block_size: relative time}, "prefill": {...}}, measured by
        `benchmarks/bench_attention.py --stages blocks` (time at each block size / time at
        block 16, the same work). None, or a kernel left out: no effect (1.0). Between
        measured sizes the cost is interpolated in log(block) and log(cost); outside them
        the nearest measured size's cost holds.
    attention_reference_block: the block size the efficiencies above describe (the engine's
        block size in the profile they were fitted on; 16, the engine's default, for
        datasheet leads). A run at block b scales attention time by
        cost(b) / cost(attention_reference_block): `attention_block_factor`.
    shared_kv_read_cost: time of a decode's read of a KV block that another decode of the
        same step reads too (prefix-cache hits share blocks), after the first read, relative
        to a first read (0 < x <= 1): the decode kernel reads a shared block once per
        sequence, and the reads after the first mostly come from L2 (50 MB on an H200),
        not HBM. 1.0 (the default): no reuse. Fitted from a profile with shared-prefix
        decode shapes; L2's capacity is not modelled (the sharing decodes of a step read a
        shared block at about the same time, so what matters is that a layer's shared
        prefix is read while it is resident, which holds for the prefixes profiled).
    """
    name: str
    peak_tflops: float
    hbm_bandwidth_gbs: float
    memory_gib: float
    flops_efficiency: float = 0.7
    flops_half_tokens: float = 0.0
    gemm_depth_overhead: float = 0.0
    bandwidth_efficiency: float = 0.85
    attention_bandwidth_efficiency: float = 0.7
    interconnect_gbs: float = 0.0
    allreduce_latency_s: float = 10e-6
    step_fixed_s: float = 0.0
    layer_fixed_s: float = 0.0
    pdl_layer_saving_s: float = 0.0
    attention_flops_efficiency: float | None = None
    expert_flops_efficiency: float | None = None
    roofline_exponent: float = math.inf
    layer_launch_s: float = 30e-6
    step_overhead_s: float = 0.5e-3
    seq_overhead_s: float = 5e-6
    update_overhead_s: float = 0.1e-3
    update_seq_overhead_s: float = 1e-6
    prefill_token_overhead_s: float = 0.0
    prefill_step_overhead_s: float = 0.0
    admit_overhead_s: float = 0.0
    admit_token_overhead_s: float = 0.0
    attention_block_cost: Any = None    # a mapping; typed Any so a Hydra override can fill a null
    attention_reference_block: int = 16
    shared_kv_read_cost: float = 1.0

    def __post_init__(self):
        for field in ("peak_tflops", "hbm_bandwidth_gbs", "memory_gib"):
            value = getattr(self, field)
            _require(value > 0, f"hardware {self.name!r}: {field} must be > 0, got {value!r}")
        for field in ("flops_efficiency", "bandwidth_efficiency", "attention_bandwidth_efficiency",
                      "shared_kv_read_cost"):
            value = getattr(self, field)
            _require(0 < value <= 1, f"hardware {self.name!r}: {field} must be in (0, 1], got {value!r}")
        a = self.attention_flops_efficiency
        _require(a is None or 0 < a <= 1,
                 f"hardware {self.name!r}: attention_flops_efficiency must be in (0, 1] or null, got {a!r}")
        a = self.expert_flops_efficiency
        _require(a is None or 0 < a <= 1,
                 f"hardware {self.name!r}: expert_flops_efficiency must be in (0, 1] or null, got {a!r}")
        _require(self.roofline_exponent >= 1,
                 f"hardware {self.name!r}: roofline_exponent must be >= 1 (.inf: the max), got {self.roofline_exponent!r}")
        for field in ("flops_half_tokens", "gemm_depth_overhead", "pdl_layer_saving_s", "interconnect_gbs", "allreduce_latency_s", "step_fixed_s",
                      "layer_fixed_s", "layer_launch_s", "step_overhead_s", "seq_overhead_s",
                      "update_overhead_s", "update_seq_overhead_s", "prefill_token_overhead_s",
                      "prefill_step_overhead_s", "admit_overhead_s", "admit_token_overhead_s"):
            value = getattr(self, field)
            _require(value >= 0, f"hardware {self.name!r}: {field} must be >= 0, got {value!r}")
        _require(self.pdl_layer_saving_s <= self.layer_fixed_s,
                 f"hardware {self.name!r}: pdl_layer_saving_s ({self.pdl_layer_saving_s!r}) must not exceed "
                 f"layer_fixed_s ({self.layer_fixed_s!r})")
        ref = self.attention_reference_block
        _require(isinstance(ref, int) and not isinstance(ref, bool) and ref >= 1,
                 f"hardware {self.name!r}: attention_reference_block must be an integer >= 1, got {ref!r}")
        # frozen: store the checked, plain copy (None, as YAML's null, is "nothing measured")
        cost = {} if self.attention_block_cost is None else self.attention_block_cost
        object.__setattr__(self, "attention_block_cost", check_block_cost(cost, f"hardware {self.name!r}"))

    @property
    def flops(self) -> float:
        """Achievable FLOP/s of a large GEMM."""
        return self.peak_tflops * 1e12 * self.flops_efficiency

    @property
    def attention_flops(self) -> float:
        """Achievable FLOP/s of the attention kernels' matrix work."""
        eff = self.flops_efficiency if self.attention_flops_efficiency is None else self.attention_flops_efficiency
        return self.peak_tflops * 1e12 * eff

    def gemm_flops(self, tokens: int) -> float:
        """Achievable FLOP/s of a GEMM over `tokens` rows."""
        return self.flops * tokens / (tokens + self.flops_half_tokens) if tokens else self.flops

    def roofline(self, compute_s: float, memory_s: float) -> float:
        """Time of a kernel group that needs `compute_s` at the achievable FLOP/s and
        `memory_s` at the achievable bandwidth (roofline_exponent)."""
        p = self.roofline_exponent
        if p == math.inf:
            return max(compute_s, memory_s)
        top = max(compute_s, memory_s)
        if top <= 0:
            return 0.0
        return top * ((compute_s / top) ** p + (memory_s / top) ** p) ** (1 / p)

    @property
    def bandwidth(self) -> float:
        """Achievable bytes/s of streaming reads (weights)."""
        return self.hbm_bandwidth_gbs * 1e9 * self.bandwidth_efficiency

    @property
    def attention_bandwidth(self) -> float:
        """Achievable bytes/s of paged KV reads."""
        return self.hbm_bandwidth_gbs * 1e9 * self.attention_bandwidth_efficiency

    def attention_block_factor(self, kernel: str, block_size: int) -> float:
        """Time of the `kernel` ("decode" | "prefill") attention at `block_size` over its time
        at `attention_reference_block`, the same work (1.0 where nothing was measured)."""
        table = self.attention_block_cost.get(kernel)
        if not table:
            return 1.0
        return block_cost(table, block_size) / block_cost(table, self.attention_reference_block)

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    def host_costs(self) -> "HostCosts":
        return HostCosts(self.step_overhead_s, self.seq_overhead_s, self.update_overhead_s,
                         self.update_seq_overhead_s, self.prefill_token_overhead_s,
                         self.prefill_step_overhead_s, self.admit_overhead_s,
                         self.admit_token_overhead_s)


def check_block_cost(value, where: str) -> dict:
    """`attention_block_cost` checked and made plain: {kernel: {int block size: float cost}},
    sizes ascending. Raises ValueError (one line, naming `where`) for anything else."""
    name = f"{where}: attention_block_cost"
    _require(isinstance(value, dict), f"{name} must be a mapping of {ATTENTION_KERNELS} to "
             f"{{block_size: relative time}}, got {value!r}")
    out = {}
    for kernel, table in value.items():
        _require(kernel in ATTENTION_KERNELS, f"{name} has unknown key {kernel!r} (known: "
                 f"{', '.join(ATTENTION_KERNELS)})")
        _require(isinstance(table, dict) and len(table) > 0,
                 f"{name}.{kernel} must be a non-empty mapping of block size to relative time, got {table!r}")
        clean = {}
        for size, cost in table.items():
            try:
                block = int(size)
                ok = block >= 1 and str(block) == str(size).strip()
            except (TypeError, ValueError):
                ok = False
            _require(ok, f"{name}.{kernel} has key {size!r}: block sizes must be integers >= 1")
            _require(block not in clean, f"{name}.{kernel} gives block size {block} twice")
            _require(isinstance(cost, (int, float)) and not isinstance(cost, bool)
                     and math.isfinite(cost) and cost > 0,
                     f"{name}.{kernel}[{block}] must be a number > 0, got {cost!r}")
            clean[block] = float(cost)
        out[kernel] = dict(sorted(clean.items()))
    return out


def block_cost(table: dict, block_size: int) -> float:
    """Relative cost at `block_size` from a {block size: cost} table (ascending keys):
    interpolated linearly in (log block, log cost) between measured sizes, the nearest
    measured cost outside them."""
    sizes = list(table)
    if block_size <= sizes[0]:
        return table[sizes[0]]
    if block_size >= sizes[-1]:
        return table[sizes[-1]]
    hi = next(i for i, s in enumerate(sizes) if s >= block_size)
    lo_size, hi_size = sizes[hi - 1], sizes[hi]
    w = math.log(block_size / lo_size) / math.log(hi_size / lo_size)
    return math.exp((1 - w) * math.log(table[lo_size]) + w * math.log(table[hi_size]))


# Where a calibration's host terms come from (HostCosts.from_calibration): "profile", the
# runner's launches of the profiled shapes plus the policy's decode scheduling ("host");
# "serving", the window forming -> launch of the engine's own step loop on synthetic
# requests, admissions included ("host_serving"; the receive terms stay the profile's); or
# "auto" (the default), "serving" where the calibration measured it, else "profile". Session
# 11's H200 calibrations (host_serving measured with turns of 0-3 admissions) put the
# fidelity table's mean TTFT within 0.51% of the engine on average with "serving", 1.05% with
# "profile" (Qwen3-0.6B, 9 cells; Llama-3.1-8B 2.95 / 3.40%: benchmarks/README.md).
HOST_WINDOWS = ("auto", "profile", "serving")
SERVING_HOST_TERMS = ("launch_s", "launch_seq_s", "launch_token_s", "launch_prompt_s", "admit_s",
                        "admit_token_s")


@dataclass(frozen=True, slots=True)
class HostCosts:
    """Host time of one turn of the step loop: before the launch (admit, form, pack, launch)
    and after the tokens arrive (receive, update), each fixed + per scheduled sequence; the
    launch also per prompt token the step computes (`launch_token_s`: a prompt chunk's
    token ids, positions and KV slots are packed token by token, so a step with 8k prompt
    tokens takes about twice a decode step's host time, more than the device needs for the
    decode step before it), and once per step that carries a prompt chunk (`launch_prompt_s`:
    the prefill path's own work, tile list and chunk bookkeeping; every H200 profile shows
    it, +330..600 us). `admit_s` + `admit_token_s` x prompt tokens: per request that arrived
    since the step before, added to the policy in the turn before the step is formed (the
    engine's add_request; a replay polls the clock, adds the arrivals, then forms the step
    at the polled time, so this time lies inside the step's window start_s -> launch_s)."""
    launch_s: float = 0.0
    launch_seq_s: float = 0.0
    receive_s: float = 0.0
    receive_seq_s: float = 0.0
    launch_token_s: float = 0.0
    launch_prompt_s: float = 0.0
    admit_s: float = 0.0
    admit_token_s: float = 0.0

    @classmethod
    def from_calibration(cls, calibration: dict, window: str = "auto",
                         source: str = "<calibration>") -> "HostCosts":
        """A calibration's host terms (HOST_WINDOWS): "profile", its `host`; "serving", its
        `host_serving` launch and admission terms with `host`'s receive terms; "auto",
        "serving" where the file has host_serving, else "profile". Raises ValueError (one
        line) for an unknown window or "serving" asked of a calibration without host_serving."""
        _require(window in HOST_WINDOWS, f"host window must be one of {HOST_WINDOWS}, got {window!r}")
        host = dict(calibration.get("host", {}))
        serving = calibration.get("host_serving")
        measured = isinstance(serving, dict) and all(k in serving for k in SERVING_HOST_TERMS)
        if window == "profile" or (window == "auto" and not measured):
            return cls(**host)
        _require(measured,
                 f"{source}: host window 'serving' needs the calibration's host_serving "
                 f"({', '.join(SERVING_HOST_TERMS)}); this one has none: re-calibrate, or use "
                 "cost_model.host_window=profile")
        receive = {k: host[k] for k in ("receive_s", "receive_seq_s") if k in host}
        return cls(**receive, **{k: float(serving[k]) for k in SERVING_HOST_TERMS})

    def before_launch(self, num_seqs: int, num_prefill_tokens: int = 0) -> float:
        return (self.launch_s + self.launch_seq_s * num_seqs + self.launch_token_s * num_prefill_tokens
                + (self.launch_prompt_s if num_prefill_tokens else 0.0))

    def admission(self, num_requests: int, num_prompt_tokens: int) -> float:
        """Host time to admit `num_requests` arrivals of `num_prompt_tokens` prompt tokens in all."""
        return self.admit_s * num_requests + self.admit_token_s * num_prompt_tokens

    def after_wait(self, num_seqs: int) -> float:
        return self.receive_s + self.receive_seq_s * num_seqs
