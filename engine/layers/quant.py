"""4-bit GPTQ and AWQ linear layers: the published tensor layouts, their reference
dequantization, and the tensor-parallel loading of them.

The layouts (per linear layer of in_features I, out_features O, G = I / group_size groups;
4-bit values packed 8 to an int32, value k of a word in bits 4k..4k+3):

  GPTQ  qweight int32 [I/8, O]   packed along the input: word [i, o] holds rows 8i..8i+7
        qzeros  int32 [G, O/8]   packed along the output: word [g, j] holds columns 8j..8j+7;
                                 checkpoint_format "gptq" stores zero - 1, "gptq_v2" zero
        scales  fp16  [G, O]
        g_idx   int32 [I]        the group of each input row (i // group_size, or scattered
                                 by act-order: desc_act)
  AWQ   qweight int32 [I, O/8]   packed along the output, interleaved: value k of word
                                 [i, j] is column 8j + AWQ_ORDER[k]
        qzeros  int32 [G, O/8]   the same interleaved packing, zero stored as is
        scales  fp16  [G, O]

  W[o, i] = (q[i, o] - zero[g(i), o]) * scale[g(i), o]

Tensor parallelism splits as for dense weights: column-parallel layers along the output
(packed columns in words of 8), row-parallel layers along the input, and with it the groups;
where the groups cannot follow the split (act-order, one group over the whole input) every
rank keeps all groups and its slice of g_idx indexes them.
"""
import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

from policy.quantization import PACK, QuantConfig

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # AutoAWQ GEMM: value k of a word is column AWQ_ORDER[k]
GROUP = "group"                        # a tensor's input dim counted in groups


# ---- the reference: unpack and dequantize, as the formats document it ------------------
def unpack_along_rows(packed: torch.Tensor) -> torch.Tensor:
    """[R, C] int32 -> [8R, C] values in 0..15: row 8r+k is value k of word [r, c]."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(1) >> shifts.view(1, PACK, 1)) & 0xF   # [R, 8, C]
    return values.reshape(-1, packed.shape[1])


def unpack_along_cols(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[R, C] int32 -> [R, 8C] values in 0..15: column 8c + order[k] is value k of word
    [r, c] (order None: the natural order, column 8c + k)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, PACK)) & 0xF   # [R, C, 8]
    if order is not None:
        # value k goes to column order[k]: gather with the inverse permutation
        inverse = [order.index(c) for c in range(PACK)]
        values = values[:, :, inverse]
    return values.reshape(packed.shape[0], -1)


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    g_idx: torch.Tensor, zero_offset: int = 1) -> torch.Tensor:
    """GPTQ tensors -> W [O, I] float32. zero_offset: 1 for checkpoint_format "gptq"."""
    q = unpack_along_rows(qweight)                           # [I, O]
    zeros = unpack_along_cols(qzeros) + zero_offset          # [G, O]
    g = g_idx.long()
    return ((q - zeros[g]).float() * scales.float()[g]).t()


def dequantize_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int) -> torch.Tensor:
    """AWQ GEMM tensors -> W [O, I] float32."""
    q = unpack_along_cols(qweight, AWQ_ORDER)                # [I, O]
    zeros = unpack_along_cols(qzeros, AWQ_ORDER)             # [G, O]
    g = awq_groups(q.shape[0], group_size, q.device)
    return ((q - zeros[g]).float() * scales.float()[g]).t()


def awq_groups(in_features: int, group_size: int, device=None) -> torch.Tensor:
    rows = torch.arange(in_features, device=device)
    return torch.zeros_like(rows) if group_size == -1 else rows // group_size


def dequantize_repacked(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                        g_idx: torch.Tensor | None, perm: torch.Tensor | None, group_size: int,
                        zero_offset: int) -> torch.Tensor:
    """The load-time kernel layout (engine.kernels.w4a16.repack: qweight [I, O/8] and qzeros
    [G, O/8] packed along the output in AWQ's order; weight row r is input feature perm[r],
    of group g_idx[r] (None: r // group_size)) -> W [O, I] float32."""
    q = unpack_along_cols(qweight, AWQ_ORDER)                # [I, O], rows in perm order
    zeros = unpack_along_cols(qzeros, AWQ_ORDER) + zero_offset   # [G, O]
    g = awq_groups(q.shape[0], group_size, q.device) if g_idx is None else g_idx.long()
    wt = (q - zeros[g]).float() * scales.float()[g]
    if perm is not None:
        wt = torch.empty_like(wt).index_copy_(0, perm.long(), wt)
    return wt.t()


def dequantize(layer: nn.Module) -> torch.Tensor:
    """This rank's W [out, in] float32 of a quantized linear layer (as loaded or repacked)."""
    cfg = layer.quant
    w = getattr(layer, "w4_repacked", None)
    if w is not None:
        return dequantize_repacked(w.qweight, w.qzeros, w.scales, w.g_idx, w.perm,
                                   w.group_size, w.zero_offset)
    if cfg.method == "gptq":
        return dequantize_gptq(layer.qweight, layer.qzeros, layer.scales, layer.g_idx,
                               cfg.zero_offset)
    return dequantize_awq(layer.qweight, layer.qzeros, layer.scales, cfg.group_size)


def linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T (+ bias) for a quantized layer: on CUDA, and wherever the layer has a
    `w4a16` plan (a kernel plan applied to an engine that interprets its Triton kernels on
    the CPU, engine.kernel_plan), the W4A16 path that plan names for this many rows
    (choose_kernels); the torch reference (dequantize, then matmul) elsewhere."""
    if x.is_cuda or getattr(layer, "w4a16", ()):
        from engine.kernels.w4a16 import w4a16_linear
        return w4a16_linear(layer, x, bias)
    return F.linear(x, dequantize(layer).to(x.dtype), bias)


def choose_kernels(model: nn.Module, pdl_rows: int = 0) -> list[dict]:
    """On CUDA, for a quantized model: repack every quantized layer into the kernels' layout
    (repack_layers), then measure and record each layer's fastest W4A16 path per row count
    (engine.kernels.w4a16.choose_w4a16; once after loading, before CUDA-graph capture; row
    counts up to pdl_rows timed with programmatic dependent launch, as the engine runs them).
    Returns its report ([] for a dense model). engine.kernel_plan.apply sets the same
    plans from a file instead (repack_layers, then w4a16.prepare_w4a16: nothing timed)."""
    if getattr(model, "quantization", None) is None:
        return []
    from engine.kernels.w4a16 import choose_w4a16
    repack_layers(model)
    return choose_w4a16(model, pdl_rows=pdl_rows)


@torch.no_grad()
def repack_layers(model: nn.Module) -> None:
    """Replace each quantized layer's checkpoint tensors by the kernel layout
    (engine.kernels.w4a16.repack), once, in place: qweight / qzeros / g_idx become the
    repacked ones (no copy kept, so the weights take the same memory) and `w4_repacked`
    holds them for the kernels. Per rank: a tensor-parallel shard repacks its own slice."""
    from engine.kernels.w4a16 import repack, weight_of
    for layer in model.modules():
        if getattr(layer, "quant", None) is None or getattr(layer, "w4_repacked", None) is not None:
            continue
        w = repack(weight_of(layer))
        layer.qweight = nn.Parameter(w.qweight, requires_grad=False)
        layer.qzeros = nn.Parameter(w.qzeros, requires_grad=False)
        if hasattr(layer, "g_idx"):
            del layer.g_idx
        if w.g_idx is not None:
            layer.g_idx = nn.Parameter(w.g_idx, requires_grad=False)
        if w.perm is not None:
            layer.register_buffer("perm", w.perm, persistent=False)
        layer.w4_repacked = w._replace(qweight=layer.qweight, qzeros=layer.qzeros,
                                       g_idx=getattr(layer, "g_idx", None))


# ---- building and loading ----------------------------------------------------------------
def tensor_specs(cfg: QuantConfig, in_features: int, out_features: int, groups: int) -> dict:
    """name -> (shape, dtype, input unit (features per entry along dim 0, or GROUP),
    output unit (features per entry along dim 1, or None: no output dim))."""
    if cfg.method == "gptq":
        return {"qweight": ((in_features // PACK, out_features), torch.int32, PACK, 1),
                "qzeros": ((groups, out_features // PACK), torch.int32, GROUP, PACK),
                "scales": ((groups, out_features), torch.float16, GROUP, 1),
                "g_idx": ((in_features,), torch.int32, 1, None)}
    return {"qweight": ((in_features, out_features // PACK), torch.int32, 1, PACK),
            "qzeros": ((groups, out_features // PACK), torch.int32, GROUP, PACK),
            "scales": ((groups, out_features), torch.float16, GROUP, 1)}


@contextlib.contextmanager
def dense_weights_on_meta():
    """While a quantized model is built, its linear layers' dense `weight` lives on the meta
    device (quantize_linears replaces it): a 70B GPTQ model never allocates 140 GB first."""
    from engine.layers.linear import LinearBase
    LinearBase.weight_device = "meta"
    try:
        yield
    finally:
        LinearBase.weight_device = None


def quantize_linears(model: nn.Module, cfg: QuantConfig) -> None:
    """Replace the `weight` of every tensor-parallel linear layer of `model` by empty 4-bit
    tensors in `cfg`'s layout, with weight loaders that take this rank's slice of the
    checkpoint's. Raises ValueError (naming the config field) where a layer's shape or the
    tensor parallelism does not fit the format."""
    from engine.layers.linear import LinearBase, RowParallelLinear
    for name, layer in model.named_modules():
        if not isinstance(layer, LinearBase):
            continue
        row = isinstance(layer, RowParallelLinear)
        tp = layer.tp_size
        in_local, out = layer.in_features, layer.out_features
        in_full = in_local * tp if row else in_local
        gs = cfg.group_size
        if gs != -1 and in_full % gs:
            raise ValueError(f"{name}: quantization_config.group_size={gs} does not divide "
                             f"in_features {in_full}")
        if in_local % PACK or out % PACK:
            raise ValueError(f"{name}: {in_local} x {out} features on this rank are not "
                             f"multiples of {PACK} (4-bit words); "
                             f"tensor_parallel_size={tp} cannot split this quantized model")
        groups = cfg.num_groups(in_full)
        split_groups = row and tp > 1 and gs != -1 and not cfg.desc_act
        if split_groups:
            if in_local % gs:
                raise ValueError(f"{name}: quantization_config.group_size={gs} does not divide "
                                 f"the {in_local} input features of each of "
                                 f"tensor_parallel_size={tp} ranks")
            groups //= tp
        del layer.weight
        device = layer.bias.device if layer.bias is not None else None
        for tensor, (shape, dtype, _, _) in tensor_specs(cfg, in_local, out, groups).items():
            param = nn.Parameter(torch.zeros(shape, dtype=dtype, device=device),
                                 requires_grad=False)
            param.weight_loader = functools.partial(_load, layer, tensor)
            layer.register_parameter(tensor, param)
        layer.quant = cfg
        layer.split_groups = split_groups
        layer.g_idx_loaded = None
    model.quantization = cfg


def _load(layer: nn.Module, tensor: str, param: nn.Parameter, loaded: torch.Tensor,
          shard_id=None) -> None:
    """Copy this rank's slice of checkpoint tensor `tensor` (of sub-layer `shard_id` of a
    fused layer) into `param`."""
    from engine.layers.linear import RowParallelLinear, copy_weight, shard_of
    cfg = layer.quant
    _, dtype, in_unit, out_unit = tensor_specs(cfg, 8, 8, 1)[tensor]
    if loaded.dtype != dtype:
        raise ValueError(f"dtype {loaded.dtype} is not the {cfg.method} layout's {dtype}")
    dest = param.data
    if tensor == "g_idx" and not cfg.desc_act:
        # the kernels take row i's group to be i // group_size unless desc_act says otherwise
        rows = torch.arange(loaded.shape[0], dtype=loaded.dtype)
        if not torch.equal(loaded, rows // cfg.group_size if cfg.group_size != -1 else rows * 0):
            raise ValueError("g_idx is not row // group_size but quantization_config.desc_act "
                             "is false")
    if isinstance(layer, RowParallelLinear):
        if in_unit != GROUP:
            size, full, start = layer.input_shard()
            loaded = shard_of(loaded, 0, full // in_unit, start // in_unit, size // in_unit)
        elif layer.split_groups:
            g = param.shape[0]
            loaded = shard_of(loaded, 0, g * layer.tp_size, layer.tp_rank * g, g)
        if tensor == "g_idx" and layer.split_groups:   # group numbers local to this rank
            loaded = loaded - layer.tp_rank * layer.scales.shape[0]
    elif out_unit is not None:
        offset, size, full, start = layer.output_shard(shard_id)
        loaded = shard_of(loaded, 1, full // out_unit, start // out_unit, size // out_unit)
        dest = dest.narrow(1, offset // out_unit, size // out_unit)
    elif tensor == "g_idx":
        # fused sub-layers share their input, so they must share the grouping of its rows
        if layer.g_idx_loaded is not None and not torch.equal(param.data, loaded.to(param.device)):
            raise ValueError(f"g_idx of shard {shard_id!r} differs from shard "
                             f"{layer.g_idx_loaded!r}'s; a fused layer needs one act-order")
        layer.g_idx_loaded = shard_id
    copy_weight(dest, loaded)
