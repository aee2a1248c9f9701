"""What the cost model knows about a GPU: peak rates, how much of them a real kernel gets,
memory, the interconnect, and the CPU-side costs of one engine step.

`conf/hardware/<name>.yaml` holds exactly these fields (`HardwareSpec(**yaml)`).
"""
from dataclasses import dataclass

GiB = 1 << 30


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
    bandwidth_efficiency: achieved / peak for streaming weight reads (0 < x <= 1).
    attention_bandwidth_efficiency: achieved / peak for paged-attention KV reads.
    interconnect_gbs: per-GPU, per-direction bandwidth seen by a tensor-parallel all-reduce.
    allreduce_latency_s: fixed cost of one all-reduce (launch + synchronisation).
    step_fixed_s: device time every step pays whatever its size (sampling, small kernels).
    layer_fixed_s: device time per decoder layer and step (the minimum of its kernels).
    layer_launch_s: extra per-layer cost of a step run eagerly (kernel launches the device
        waits for); a step replayed from a CUDA graph does not pay it.
    step_overhead_s, seq_overhead_s: host time to form, pack and launch a step: fixed, and
        per scheduled sequence.
    update_overhead_s, update_seq_overhead_s: host time after a step's tokens arrive
        (receive them, update the policy): fixed, and per scheduled sequence.
    Host time runs concurrently with the device under asynchronous scheduling; the
    simulator's step loop (policy.step_loop) charges what the device does not hide.
    """
    name: str
    peak_tflops: float
    hbm_bandwidth_gbs: float
    memory_gib: float
    flops_efficiency: float = 0.7
    flops_half_tokens: float = 0.0
    bandwidth_efficiency: float = 0.85
    attention_bandwidth_efficiency: float = 0.7
    interconnect_gbs: float = 0.0
    allreduce_latency_s: float = 10e-6
    step_fixed_s: float = 0.0
    layer_fixed_s: float = 0.0
    layer_launch_s: float = 30e-6
    step_overhead_s: float = 0.5e-3
    seq_overhead_s: float = 5e-6
    update_overhead_s: float = 0.1e-3
    update_seq_overhead_s: float = 1e-6

    def __post_init__(self):
        for field in ("peak_tflops", "hbm_bandwidth_gbs", "memory_gib"):
            value = getattr(self, field)
            _require(value > 0, f"hardware {self.name!r}: {field} must be > 0, got {value!r}")
        for field in ("flops_efficiency", "bandwidth_efficiency", "attention_bandwidth_efficiency"):
            value = getattr(self, field)
            _require(0 < value <= 1, f"hardware {self.name!r}: {field} must be in (0, 1], got {value!r}")
        for field in ("flops_half_tokens", "interconnect_gbs", "allreduce_latency_s", "step_fixed_s",
                      "layer_fixed_s", "layer_launch_s", "step_overhead_s", "seq_overhead_s",
                      "update_overhead_s", "update_seq_overhead_s"):
            value = getattr(self, field)
            _require(value >= 0, f"hardware {self.name!r}: {field} must be >= 0, got {value!r}")

    @property
    def flops(self) -> float:
        """Achievable FLOP/s of a large GEMM."""
        return self.peak_tflops * 1e12 * self.flops_efficiency

    def gemm_flops(self, tokens: int) -> float:
        """Achievable FLOP/s of a GEMM over `tokens` rows."""
        return self.flops * tokens / (tokens + self.flops_half_tokens) if tokens else self.flops

    @property
    def bandwidth(self) -> float:
        """Achievable bytes/s of streaming reads (weights)."""
        return self.hbm_bandwidth_gbs * 1e9 * self.bandwidth_efficiency

    @property
    def attention_bandwidth(self) -> float:
        """Achievable bytes/s of paged KV reads."""
        return self.hbm_bandwidth_gbs * 1e9 * self.attention_bandwidth_efficiency

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    def host_costs(self) -> "HostCosts":
        return HostCosts(self.step_overhead_s, self.seq_overhead_s, self.update_overhead_s,
                         self.update_seq_overhead_s)


@dataclass(frozen=True, slots=True)
class HostCosts:
    """Host time of one turn of the step loop: before the launch (form, pack, launch) and
    after the tokens arrive (receive, update), each fixed + per scheduled sequence."""
    launch_s: float = 0.0
    launch_seq_s: float = 0.0
    receive_s: float = 0.0
    receive_seq_s: float = 0.0

    def before_launch(self, num_seqs: int) -> float:
        return self.launch_s + self.launch_seq_s * num_seqs

    def after_wait(self, num_seqs: int) -> float:
        return self.receive_s + self.receive_seq_s * num_seqs
