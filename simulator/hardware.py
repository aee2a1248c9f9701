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
    efficiency factors turn them into what a good kernel achieves.

    peak_tflops: dense bf16 tensor-core TFLOP/s (no sparsity).
    hbm_bandwidth_gbs: memory bandwidth, GB/s (1e9 bytes/s).
    memory_gib: device memory the engine sizes its KV pool from, GiB.
    flops_efficiency, bandwidth_efficiency: achieved / peak for large GEMMs and for
        streaming reads (0 < x <= 1).
    interconnect_gbs: per-GPU, per-direction bandwidth seen by a tensor-parallel all-reduce.
    allreduce_latency_s: fixed cost of one all-reduce (launch + synchronisation).
    step_overhead_s: CPU time of every step (scheduling, input preparation, sampling launch)
        not hidden behind the GPU.
    seq_overhead_s: CPU time per scheduled sequence (its share of input preparation).
    layer_launch_s: kernel-launch cost per decoder layer of a step run eagerly; a step
        replayed from a CUDA graph does not pay it.
    cuda_graph_max_batch: largest decode batch replayed from a CUDA graph (0 = eager only).
        Graphs are captured at 1, 2, 4, 8, 16, 32, 48 ... (multiples of 16, as nano-vLLM), so
        a decode batch is padded up to the next captured size.
    """
    name: str
    peak_tflops: float
    hbm_bandwidth_gbs: float
    memory_gib: float
    flops_efficiency: float = 0.7
    bandwidth_efficiency: float = 0.85
    interconnect_gbs: float = 0.0
    allreduce_latency_s: float = 10e-6
    step_overhead_s: float = 0.5e-3
    seq_overhead_s: float = 5e-6
    layer_launch_s: float = 30e-6
    cuda_graph_max_batch: int = 512

    def __post_init__(self):
        for field in ("peak_tflops", "hbm_bandwidth_gbs", "memory_gib"):
            value = getattr(self, field)
            _require(value > 0, f"hardware {self.name!r}: {field} must be > 0, got {value!r}")
        for field in ("flops_efficiency", "bandwidth_efficiency"):
            value = getattr(self, field)
            _require(0 < value <= 1, f"hardware {self.name!r}: {field} must be in (0, 1], got {value!r}")
        for field in ("interconnect_gbs", "allreduce_latency_s", "step_overhead_s",
                      "seq_overhead_s", "layer_launch_s", "cuda_graph_max_batch"):
            value = getattr(self, field)
            _require(value >= 0, f"hardware {self.name!r}: {field} must be >= 0, got {value!r}")

    @property
    def flops(self) -> float:
        """Achievable FLOP/s."""
        return self.peak_tflops * 1e12 * self.flops_efficiency

    @property
    def bandwidth(self) -> float:
        """Achievable bytes/s."""
        return self.hbm_bandwidth_gbs * 1e9 * self.bandwidth_efficiency

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GiB)

    def graph_batch_size(self, num_seqs: int) -> int:
        """The captured CUDA-graph size a decode batch of `num_seqs` replays (padded up), or
        0 if it runs eagerly (graphs off, or the batch is larger than the largest graph)."""
        padded = 1 << (num_seqs - 1).bit_length() if num_seqs <= 8 else -(-num_seqs // 16) * 16
        return padded if padded <= self.cuda_graph_max_batch else 0
