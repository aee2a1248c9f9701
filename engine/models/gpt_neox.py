"""GPT-NeoX (Pythia, GPT-NeoX-20B):

    embed_in -> N x [x + attn(LN1(x)) + mlp(LN2(x))       (parallel residual)
                     or h = x + attn(LN1(x)); h + mlp(LN2(h))] -> LN -> embed_out

LayerNorm with bias; attention with a fused query_key_value projection (biased) and RoPE on
the first `rotary_dim` dims of each head only; a GELU MLP (dense_h_to_4h, dense_4h_to_h,
biased); an untied output embedding. Module and parameter names are Hugging Face's, so
checkpoint tensors load by name; only query_key_value's rows are reordered on load.
"""
import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import (ColumnParallelLinear, RowParallelLinear, copy_weight,
                                  shard_of)
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import GELU_ACTS, ModelConfig


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm whose weight and bias are frozen (inference) parameters."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps=eps)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)


class NeoXQKVLinear(ColumnParallelLinear):
    """query_key_value, heads split over ranks. The checkpoint interleaves per head (rows
    [head, (q|k|v), head_dim]); this rank keeps its heads, reordered to [q; k; v]."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int,
                 tp_rank: int = 0, tp_size: int = 1):
        if num_heads % tp_size:
            raise ValueError(f"num_heads ({num_heads}) not divisible by tp_size ({tp_size})")
        self.num_heads, self.head_dim = num_heads // tp_size, head_dim
        super().__init__(hidden_size, 3 * num_heads * head_dim, True, tp_rank, tp_size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        h, d = self.num_heads, self.head_dim
        full = shard_of(loaded, 0, 3 * h * d * self.tp_size, 0, 3 * h * d * self.tp_size)
        heads = full.reshape(h * self.tp_size, 3, d, *loaded.shape[1:])[self.tp_rank * h:][:h]
        copy_weight(param, heads.transpose(0, 1).reshape(param.shape))


class GPTNeoXAttention(nn.Module):

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: str,
                 tp_rank: int, tp_size: int):
        super().__init__()
        self.query_key_value = NeoXQKVLinear(cfg.hidden_size, cfg.num_attention_heads,
                                             cfg.head_dim, tp_rank, tp_size)
        self.dense = RowParallelLinear(cfg.q_size, cfg.hidden_size, cfg.o_bias, tp_rank, tp_size)
        self.num_heads, self.head_dim = self.query_key_value.num_heads, cfg.head_dim
        self.rotary_dim = cfg.rope_dim
        self.rotary_emb = rotary
        self.attn = Attention(self.num_heads, self.num_heads, cfg.head_dim, cfg.head_dim ** -0.5,
                              backend)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, h, d, r = x.shape[0], self.num_heads, self.head_dim, self.rotary_dim
        q, k, v = self.query_key_value(x).view(num_tokens, 3, h, d).unbind(1)
        q_rot, k_rot = self.rotary_emb(positions, q[..., :r], k[..., :r])  # partial rotary
        q = torch.cat([q_rot, q[..., r:]], dim=-1)
        k = torch.cat([k_rot, k[..., r:]], dim=-1)
        o = self.attn(q, k, v.contiguous(), meta)
        return self.dense(o.reshape(num_tokens, h * d))


class GPTNeoXMLP(nn.Module):

    def __init__(self, cfg: ModelConfig, tp_rank: int, tp_size: int):
        super().__init__()
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, True,
                                                  tp_rank, tp_size)
        self.dense_4h_to_h = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, True,
                                               tp_rank, tp_size)
        self.approximate = GELU_ACTS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.approximate))


class GPTNeoXLayer(nn.Module):

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: str,
                 tp_rank: int, tp_size: int):
        super().__init__()
        self.use_parallel_residual = cfg.parallel_residual
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = GPTNeoXAttention(cfg, rotary, backend, tp_rank, tp_size)
        self.mlp = GPTNeoXMLP(cfg, tp_rank, tp_size)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        attn = self.attention(positions, self.input_layernorm(x), meta)
        if self.use_parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        h = x + attn
        return h + self.mlp(self.post_attention_layernorm(h))


class GPTNeoXModel(nn.Module):

    def __init__(self, cfg: ModelConfig, max_position: int, backend: str,
                 tp_rank: int, tp_size: int):
        super().__init__()
        self.embed_in = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
        rotary = RotaryEmbedding(cfg.rope_dim, max_position, cfg.rope_theta, cfg.rope_type,
                                 cfg.rope_factor, cfg.rope_low_freq_factor,
                                 cfg.rope_high_freq_factor, cfg.rope_original_max_position)
        self.layers = nn.ModuleList(GPTNeoXLayer(cfg, rotary, backend, tp_rank, tp_size)
                                    for _ in range(cfg.num_hidden_layers))
        self.final_layer_norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        hidden = self.embed_in(input_ids)
        for layer in self.layers:
            hidden = layer(positions, hidden, meta)
        return self.final_layer_norm(hidden)


class GPTNeoXForCausalLM(nn.Module):
    """The same contract as engine.models.transformer.CausalLM (forward, compute_logits,
    attention_layers)."""
    packed_modules_mapping = {}   # checkpoint names are ours

    def __init__(self, cfg: ModelConfig, max_position: int | None = None,
                 attention_backend: str = "torch", tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        cfg.check_tp(tp_size)
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
        self.config = cfg
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.max_position = max_position or cfg.max_position_embeddings
        self.gpt_neox = GPTNeoXModel(cfg, self.max_position, attention_backend, tp_rank, tp_size)
        self.embed_out = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
        if cfg.tie_word_embeddings:
            self.embed_out.weight = self.gpt_neox.embed_in.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.gpt_neox(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embed_out(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.attention.attn for layer in self.gpt_neox.layers]
