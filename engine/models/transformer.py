"""One generic decoder-only transformer for Qwen3, Qwen2/2.5, Llama 2/3.x, Mistral and, with
routed experts in place of the MLP (engine.layers.moe), Qwen3-MoE and Mixtral.

    embed -> N x [RMSNorm -> attention (qkv, q/k-norm?, RoPE, paged attention, o)
                  RMSNorm -> SwiGLU MLP (gate_up, silu*mul, down)] -> RMSNorm -> LM head

Module and parameter names follow Hugging Face (model.layers.N.self_attn...), except that
q/k/v are fused into `qkv_proj` and gate/up into `gate_up_proj`; `packed_modules_mapping`
tells the loader how checkpoint tensors map onto them.
"""
import torch
from torch import nn

from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention, AttentionMetadata
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.layernorm import RMSNorm
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.moe import FusedMoE
from engine.layers.rotary import RotaryEmbedding
from engine.models.config import ModelConfig


class DecoderAttention(nn.Module):

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: str,
                 tp_rank: int, tp_size: int):
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads,
                                          cfg.num_key_value_heads, cfg.qkv_bias, tp_rank, tp_size)
        self.o_proj = RowParallelLinear(cfg.q_size, cfg.hidden_size, cfg.o_bias, tp_rank, tp_size)
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = cfg.head_dim
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.rotary_emb = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, cfg.head_dim,
                              cfg.head_dim ** -0.5, backend)

    fused = False   # build_model sets it: q/k-norm, RoPE and the KV store in one Triton kernel

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.attend_qkv(positions, self.qkv_proj(x), meta)

    def attend_qkv(self, positions: torch.Tensor, qkv: torch.Tensor,
                   meta: AttentionMetadata) -> torch.Tensor:
        """Everything after the qkv projection (DecoderLayer may compute qkv itself, its
        input norm fused in)."""
        num_tokens, d = qkv.shape[0], self.head_dim
        if self.fused and self.attn.k_cache.numel():
            norms = ((self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm
                     else (None, None, 0.0))
            # decode-only steps: norm, RoPE and the K/V store inside the decode launch
            o = self.attn.attend_qkv(qkv, positions, self.rotary_emb.cos, self.rotary_emb.sin, *norms, meta)
            if o is None:
                from engine.kernels.fused import qk_norm_rope_store
                q = qk_norm_rope_store(
                    qkv, positions, self.rotary_emb.cos, self.rotary_emb.sin, self.num_heads,
                    self.num_kv_heads, d, *norms, self.attn.k_cache, self.attn.v_cache, meta.slot_mapping)
                o = self.attn.attend(q, meta)
            return self.o_proj(o.reshape(num_tokens, self.num_heads * d))
        q, k, v = qkv.split(
            [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1)
        q, k = self.qk_norm_rope(positions, q, k)
        o = self.attn(q, k, v.view(num_tokens, self.num_kv_heads, d), meta)
        return self.o_proj(o.reshape(num_tokens, self.num_heads * d))

    def qk_norm_rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q [T, H*D], k [T, Hkv*D] -> heads, q/k RMSNorm (Qwen3), RoPE: the reference path
        (engine.kernels.fused.qk_norm_rope_store is its one-kernel twin)."""
        num_tokens, d = q.shape[0], self.head_dim
        q = q.view(num_tokens, self.num_heads, d)
        k = k.view(num_tokens, self.num_kv_heads, d)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return self.rotary_emb(positions, q, k)


class MLP(nn.Module):

    def __init__(self, cfg: ModelConfig, tp_rank: int, tp_size: int):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, False, tp_rank, tp_size)
        self.act_fn = SiluAndMul()
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, False,
                                           tp_rank, tp_size)
        self.down_proj.swiglu_input = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.act_fn.fused:   # SiLU-and-mul inside down_proj's skinny GEMM where it runs
            return self.down_proj(gate_up, swiglu=True)
        return self.down_proj(self.act_fn(gate_up))


class DecoderLayer(nn.Module):

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, backend: str,
                 tp_rank: int, tp_size: int, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(cfg, rotary, backend, tp_rank, tp_size)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if layer_idx in cfg.moe_layers:   # Qwen3-MoE, Mixtral: routed experts
            self.mlp = FusedMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                                cfg.num_experts_per_tok, cfg.norm_topk_prob, tp_rank, tp_size)
        else:
            self.mlp = MLP(cfg, tp_rank, tp_size)
            self.mlp.gate_up_proj.norm_input = True
        self.self_attn.qkv_proj.norm_input = True

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, meta: AttentionMetadata):
        # Each norm runs in the next projection's kernel where that layer's measured plan
        # says so (engine.layers.linear.LinearBase.forward_rmsnorm), else as its own kernel.
        qkv, residual = self.self_attn.qkv_proj.forward_rmsnorm(hidden, residual, self.input_layernorm)
        hidden = self.self_attn.attend_qkv(positions, qkv, meta)
        if isinstance(self.mlp, MLP):
            gate_up, residual = self.mlp.gate_up_proj.forward_rmsnorm(
                hidden, residual, self.post_attention_layernorm)
            return self.mlp.down(gate_up), residual
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class TransformerModel(nn.Module):

    def __init__(self, cfg: ModelConfig, max_position: int, backend: str,
                 tp_rank: int, tp_size: int):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                   tp_rank, tp_size)
        # one cos/sin table shared by every layer
        rotary = RotaryEmbedding(cfg.head_dim, max_position, cfg.rope_theta, cfg.rope_type,
                                 cfg.rope_factor, cfg.rope_low_freq_factor,
                                 cfg.rope_high_freq_factor, cfg.rope_original_max_position)
        self.layers = nn.ModuleList(DecoderLayer(cfg, rotary, backend, tp_rank, tp_size, i)
                                    for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """The decoder plus its LM head.

    forward(input_ids [T] long, positions [T] long, meta) -> hidden [T, hidden_size]
    compute_logits(hidden [S, hidden_size]) -> logits [S, vocab_size], full vocabulary on
        every tensor-parallel rank (all-gathered)
    attention_layers() -> the Attention modules, in layer order (the runner sets their
        k_cache / v_cache)
    """
    # checkpoint module name -> (our fused module, shard id)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, max_position: int | None = None,
                 attention_backend: str = "torch", tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        cfg.check_tp(tp_size)
        if not 0 <= tp_rank < tp_size:
            raise ValueError(f"tp_rank must be in [0, {tp_size}), got {tp_rank}")
        self.config = cfg
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.max_position = max_position or cfg.max_position_embeddings
        self.model = TransformerModel(cfg, self.max_position, attention_backend, tp_rank, tp_size)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp_rank, tp_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers]
