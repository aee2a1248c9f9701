"""Mixture-of-experts MLP (Qwen3-MoE, Mixtral): a router and stacked SwiGLU experts.

    router logits = x @ gate^T                      [T, E]
    p = softmax(logits) (float32); top-k experts per token; renormalize to sum 1 if asked
    y[t] = sum over its k experts e of p[t, e] * down_e(silu(gate_e(x[t])) * up_e(x[t]))

The experts are stacked into two tensors, w13 [E, 2*I, H] (gate rows, then up rows) and
w2 [E, H, I], so one kernel can run all of them (engine.kernels.fused_moe); the checkpoint
keeps one tensor per expert, which `weight_loader` copies into its slice.

Tensor parallelism splits every expert's intermediate dim I over the ranks (each rank holds
all experts, I/tp wide): gate/up are column-parallel and down row-parallel, so the layer
costs one all-reduce, like a dense MLP, and every rank's load is balanced whatever the
routing. (Expert parallelism, whole experts per rank, pays only with all-to-all over many
GPUs; not implemented.)
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import copy_weight, shard_of


def route(logits: torch.Tensor, top_k: int, renormalize: bool):
    """logits [T, E] -> (weights [T, k] float32, expert ids [T, k] int64), as transformers
    routes: softmax over all experts in float32, the k largest, divided by their sum when
    `renormalize` (for Mixtral that is the softmax over the top-k logits)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """The experts in torch: tokens sorted by expert, each expert's rows through its MLP,
    scaled by their routing weight and summed back per token. x [T, H], w13 [E, 2I, H],
    w2 [E, H, I], weights/ids [T, k] -> [T, H] (x's dtype). Reads expert counts on the host:
    not capturable in a CUDA graph (the Triton kernel is)."""
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)               # (token, slot) pairs by expert
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    token_of = order // top_k
    out = torch.zeros(num_tokens, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        rows = token_of[start:start + n]
        gate, up = F.linear(x[rows], w13[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w2[expert])
        w = weights.reshape(-1)[order[start:start + n]]
        out.index_add_(0, rows, (y * w.to(y.dtype)[:, None]).float())
        start += n
    return out.to(x.dtype)


class FusedMoE(nn.Module):
    """Router + experts of one layer, this rank's slice of every expert.

    forward(x [T, H]) -> [T, H], all-reduced over the tensor-parallel ranks.
    Parameters: gate.weight [E, H] (replicated), w13 [E, 2*I/tp, H], w2 [E, H, I/tp].
    """

    fused = False   # build_model sets it (with the Triton backends): engine.kernels.fused_moe
    moe_tiles = ()  # the fused kernels' tiles per token count: fused_moe.choose_moe_tiles sets it

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 renormalize: bool, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if intermediate_size % tp_size:
            raise ValueError(f"moe_intermediate_size ({intermediate_size}) not divisible by "
                             f"tp_size ({tp_size})")
        self.num_experts, self.top_k, self.renormalize = num_experts, top_k, renormalize
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.intermediate = intermediate_size // tp_size
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.gate.weight.requires_grad_(False)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden_size),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, self.intermediate),
                               requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor,
                      shard: tuple[int, int]) -> None:
        """Copy expert `shard[0]`'s checkpoint tensor: shard[1] 0 = gate, 1 = up (rows of
        w13), 2 = down (w2); this rank's slice of the intermediate dim."""
        expert, which = shard
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} out of range [0, {self.num_experts})")
        i, full = self.intermediate, self.intermediate * self.tp_size
        start = self.tp_rank * i
        if which == 2:
            copy_weight(param.data[expert], shard_of(loaded, 1, full, start, i))
        else:
            copy_weight(param.data[expert].narrow(0, which * i, i), shard_of(loaded, 0, full, start, i))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)
        if self.fused:   # routing, alignment, experts and the sum in 4-5 Triton launches
            from engine.kernels.fused_moe import fused_experts
            y = fused_experts(x, logits, self.w13, self.w2, self.top_k, self.renormalize,
                              self.moe_tiles)
        else:
            y = moe_reference(x, self.w13, self.w2, *route(logits, self.top_k, self.renormalize))
        if self.tp_size > 1:
            dist.all_reduce(y)
        return y


def choose_moe_tiles(model: nn.Module, max_tokens: int) -> list[dict]:
    """Time and set the fused kernels' tiles of the model's fused MoE layers
    (engine.kernels.fused_moe.choose_moe_tiles; Triton is imported only where there are
    any). Returns its report, [] without such layers."""
    if not any(isinstance(m, FusedMoE) and m.fused for m in model.modules()):
        return []
    from engine.kernels import fused_moe
    return fused_moe.choose_moe_tiles(model, max_tokens)


# checkpoint expert module -> (our stacked parameter, which): Qwen3-MoE names, Mixtral names
EXPERT_TENSORS = {"gate_proj": ("w13", 0), "up_proj": ("w13", 1), "down_proj": ("w2", 2),
                  "w1": ("w13", 0), "w3": ("w13", 1), "w2": ("w2", 2)}


def expert_target(name: str):
    """'...mlp.experts.5.up_proj.weight' (or Mixtral's '...block_sparse_moe.experts.5.w3.weight')
    -> ('...mlp.w13', (5, 1)); Mixtral's router '...block_sparse_moe.gate.weight' ->
    ('...mlp.gate.weight', None); None for any other name."""
    parts = name.replace(".block_sparse_moe.", ".mlp.").split(".")
    if "experts" in parts:
        i = parts.index("experts")
        if len(parts) == i + 4 and parts[i + 1].isdigit() and parts[i + 2] in EXPERT_TENSORS \
                and parts[i + 3] == "weight":
            param, which = EXPERT_TENSORS[parts[i + 2]]
            return ".".join(parts[:i] + [param]), (int(parts[i + 1]), which)
        return None
    if ".block_sparse_moe." in name:
        return ".".join(parts), None
    return None


def expert_checkpoint_names(prefix: str, num_experts: int, architecture: str) -> list[str]:
    """The checkpoint tensors of the FusedMoE at `prefix` ('model.layers.3.mlp.')."""
    if architecture == "MixtralForCausalLM":
        prefix = prefix.replace(".mlp.", ".block_sparse_moe.")
        projs = ("w1", "w2", "w3")
    else:
        projs = ("gate_proj", "up_proj", "down_proj")
    return [f"{prefix}gate.weight"] + [f"{prefix}experts.{e}.{p}.weight"
                                       for e in range(num_experts) for p in projs]
