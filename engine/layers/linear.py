"""Tensor-parallel linear layers (Megatron style) and their weight loaders.

Column-parallel layers split the output features over ranks and need no communication;
row-parallel layers split the input features and all-reduce their partial sums. A column
layer followed by a row layer (qkv -> o, gate_up -> down) costs one all-reduce.

Every parameter carries a `weight_loader(param, loaded_weight[, shard_id])` that copies
this rank's slice of a full checkpoint tensor into it. The rank and world size come from
the constructor: there is no global parallel state.

A layer of a quantized model (engine.layers.quant.quantize_linears) holds 4-bit tensors in
place of `weight`; `quant` is then set, and the matmul dequantizes (the slices it loads
come from the same `output_shard` / `input_shard` rules).

A dense layer's matmul is F.linear, or the Triton skinny GEMM for decode-sized inputs where
engine.kernels.skinny_gemm.choose_skinny_gemm measured it faster for the layer's shape at
that many rows (its `skinny` plan; empty unless the measurement ran: on the CPU, always
F.linear). An MLP's down projection may take the gate_up output and fold SiLU-and-mul into
that kernel (`swiglu`); a decoder layer's qkv and gate_up projections may fold the RMSNorm
(and residual add) before them into it (`forward_rmsnorm`, its own measured plan).
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.layers import quant


def copy_weight(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy `loaded` into `param` (any dtype/device), insisting on equal shapes."""
    if param.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} does not fit the parameter's "
                         f"{tuple(param.shape)}")
    param.data.copy_(loaded)


def skinny_split(skinny: tuple, rows: int) -> int:
    """The skinny-GEMM plan's split-K for a call of `rows` rows, 0 for torch: the plan is
    ((measured rows M, split_k, or 0 where torch won), ...) ascending; a call follows the
    entry of the smallest M >= rows, and torch above the largest."""
    for max_rows, split_k in skinny:
        if rows <= max_rows:
            return split_k if rows else 0
    return 0


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 skinny: tuple = (), swiglu: bool = False, skinny_swiglu: tuple = ()) -> torch.Tensor:
    """F.linear(x, weight, bias), or engine.kernels.skinny_gemm where the plan `skinny`
    says so (see skinny_split).

    swiglu: x is [..., 2K] = [gate | up] and the layer's input is silu(gate) * up (an MLP's
    down projection on the fused path): where the plan `skinny_swiglu` takes the rows, the
    kernel applies SiLU-and-mul as it loads x (one launch); else engine.kernels.fused.
    silu_and_mul runs first and the product follows `skinny`. Either way the activations
    are bit for bit silu_and_mul's."""
    rows = x.numel() // x.shape[-1]
    if swiglu:
        split_k = skinny_split(skinny_swiglu, rows) if skinny_swiglu else 0
        if split_k:
            from engine.kernels.skinny_gemm import skinny_linear
            return skinny_linear(x, weight, bias, split_k, swiglu=True)
        x = swiglu_activation(x)
    split_k = skinny_split(skinny, rows) if skinny else 0
    if split_k:
        from engine.kernels.skinny_gemm import skinny_linear
        return skinny_linear(x, weight, bias, split_k)
    return F.linear(x, weight, bias)


def swiglu_activation(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of x [..., 2K] = [gate | up], on the fused Triton kernel."""
    from engine.kernels.fused import silu_and_mul
    return silu_and_mul(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], x.shape[-1] // 2)


def shard_of(loaded: torch.Tensor, dim: int, full: int, start: int, size: int) -> torch.Tensor:
    """Slice [start, start + size) along `dim` of a checkpoint tensor whose `dim` must have
    `full` entries."""
    if loaded.dim() <= dim or loaded.shape[dim] != full:
        raise ValueError(f"shape {tuple(loaded.shape)} does not fit: expected {full} "
                         f"entries along dim {dim}")
    return loaded.narrow(dim, start, size)


class LinearBase(nn.Module):
    """y = x W^T (+ b) with W of shape [out_features, in_features] on this rank."""
    quant = None    # a QuantConfig when quantize_linears replaced `weight` by 4-bit tensors
    weight_device = None   # "meta" while a quantized model is built: `weight` is never allocated
    skinny = ()     # the skinny-GEMM plan choose_skinny_gemm sets (see dense_linear)
    swiglu_input = False   # an MLP's down projection: fed [gate | up] on the fused path
    skinny_swiglu = ()     # choose_skinny_gemm's plan for SiLU-and-mul in the kernel (dense_linear)
    norm_input = False     # a decoder layer's qkv / gate_up projection: input = an RMSNorm's output
    skinny_norm = ()       # choose_skinny_gemm's plan for that norm in the kernel (forward_rmsnorm)

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=self.weight_device),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, swiglu: bool = False) -> torch.Tensor:
        """swiglu: x is [..., 2 * in_features] = [gate | up], the input silu(gate) * up."""
        if self.quant is not None:
            return quant.linear(self, swiglu_activation(x) if swiglu else x, bias)
        return dense_linear(x, self.weight, bias, self.skinny, swiglu, self.skinny_swiglu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def forward_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor | None,
                        norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x + residual)), x + residual), the residual stream as `norm`
        (engine.layers.layernorm.RMSNorm) returns it; residual None: (self(norm(x)), x).
        Where the `skinny_norm` plan takes this many rows (a dense layer, the norm on its
        fused path) one kernel does both: engine.kernels.skinny_gemm.skinny_gemm_rmsnorm."""
        rows = x.numel() // x.shape[-1]
        split_k = 0
        if self.skinny_norm and self.quant is None and norm.fused and x.dim() == 2:
            split_k = skinny_split(self.skinny_norm, rows)
        if split_k:
            from engine.kernels.skinny_gemm import skinny_gemm_rmsnorm
            return skinny_gemm_rmsnorm(x, residual, norm.weight, norm.eps, self.weight, self.bias, split_k)
        if residual is None:
            return self(norm(x)), x
        x, residual = norm(x, residual)
        return self(x), residual


class ColumnParallelLinear(LinearBase):
    """Output features split evenly: rank r holds rows [r*out/tp, (r+1)*out/tp)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        if out_features % tp_size:
            raise ValueError(f"out_features ({out_features}) not divisible by tp_size ({tp_size})")
        super().__init__(in_features, out_features // tp_size, bias, tp_rank, tp_size)

    def output_shard(self, shard_id=None) -> tuple[int, int, int, int]:
        """(offset in this rank's output, size, the checkpoint tensor's full output, start of
        this rank's slice in it) for checkpoint tensor `shard_id`, in output features."""
        size = self.out_features
        return 0, size, size * self.tp_size, self.tp_rank * size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        offset, size, full, start = self.output_shard(shard_id)
        copy_weight(param.data.narrow(0, offset, size), shard_of(loaded, 0, full, start, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel layers fused along the output (gate and up of the MLP).
    Checkpoint tensor `shard_id` (0, 1, ...) fills this rank's slice of sub-layer shard_id."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        self.output_sizes = list(output_sizes)
        for size in output_sizes:
            if size % tp_size:
                raise ValueError(f"output size {size} not divisible by tp_size ({tp_size})")
        super().__init__(in_features, sum(output_sizes), bias, tp_rank, tp_size)

    def output_shard(self, shard_id: int) -> tuple[int, int, int, int]:
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        return offset, size, self.output_sizes[shard_id], self.tp_rank * size


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections fused; heads split over ranks. When there are fewer KV heads
    than ranks, each KV head is replicated: rank r holds KV head r * num_kv_heads // tp_size."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        if num_heads % tp_size:
            raise ValueError(f"num_heads ({num_heads}) not divisible by tp_size ({tp_size})")
        if num_kv_heads % tp_size and tp_size % num_kv_heads:
            raise ValueError(f"num_kv_heads ({num_kv_heads}) and tp_size ({tp_size}) must "
                             "divide one another")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp_size
        self.num_kv_heads = max(1, num_kv_heads // tp_size)
        self.total_kv_heads = num_kv_heads
        self.kv_head_start = tp_rank * num_kv_heads // tp_size
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, out * tp_size, bias, tp_rank, tp_size)

    def output_shard(self, shard_id: str) -> tuple[int, int, int, int]:
        q, kv, d = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.head_dim
        full_kv = self.total_kv_heads * d
        if shard_id == "q":
            offset, size, full, start = 0, q, q * self.tp_size, self.tp_rank * q
        elif shard_id == "k":
            offset, size, full, start = q, kv, full_kv, self.kv_head_start * d
        elif shard_id == "v":
            offset, size, full, start = q + kv, kv, full_kv, self.kv_head_start * d
        else:
            raise ValueError(f"qkv shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        return offset, size, full, start


class RowParallelLinear(LinearBase):
    """Input features split evenly; partial outputs are summed with an all-reduce. The bias
    is added once (by rank 0) before the reduction."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        if in_features % tp_size:
            raise ValueError(f"in_features ({in_features}) not divisible by tp_size ({tp_size})")
        super().__init__(in_features // tp_size, out_features, bias, tp_rank, tp_size)

    def input_shard(self) -> tuple[int, int, int]:
        """(size, the checkpoint tensor's full input, start of this rank's slice), in input
        features."""
        size = self.in_features
        return size, size * self.tp_size, self.tp_rank * size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # bias: whole on every rank
            copy_weight(param, loaded)
            return
        size, full, start = self.input_shard()
        copy_weight(param, shard_of(loaded, 1, full, start, size))

    def forward(self, x: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
        """swiglu: x is this rank's [gate | up] slice of the MLP's gate_up output (see
        dense_linear); set `swiglu_input` so choose_skinny_gemm times the layer that way."""
        y = self.matmul(x, self.bias if self.tp_rank == 0 else None, swiglu)
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y
