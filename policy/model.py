"""The model description both executors use: the architecture facts of a Hugging Face
config.json, read as transformers reads it, and refused where the engine cannot honour it.

Torch-free: the engine builds its layers from it (engine.models), the simulator its costs
(simulator.cost_model.ModelSpec). A key missing from config.json takes the default of that
architecture's transformers config class (checked against transformers 5.x: LlamaConfig,
Qwen2Config, Qwen3Config, MistralConfig, GPTNeoXConfig, Qwen3MoeConfig, MixtralConfig), never
a default of ours: a Qwen3 config without head_dim has head_dim 128, a Mistral one without
sliding_window slides over 4096 tokens.

One generic decoder covers the Llama-family architectures; what tells them apart is a handful
of flags (q/k RMSNorm, q/k/v bias, RoPE scaling). GPT-NeoX differs in its layer (LayerNorm
with bias, parallel residual, partial rotary, GELU MLP with bias); Qwen3-MoE and Mixtral in
their MLP (a router picks `num_experts_per_tok` of `num_experts` SwiGLU experts per token).
"""
import json
from dataclasses import dataclass
from pathlib import Path

from policy.quantization import QuantConfig

# What sets each architecture apart; a bias of None follows config.json's attention_bias.
# Qwen2 hard-wires q/k/v biases and never has an o_proj bias; Llama and Qwen3 put
# `attention_bias` on all four projections; Mistral has no biases; Qwen3 RMS-normalizes
# each head of q and k before RoPE.
ARCHITECTURES = {
    "Qwen3ForCausalLM": dict(qk_norm=True, qkv_bias=None, o_bias=None),
    "Qwen2ForCausalLM": dict(qk_norm=False, qkv_bias=True, o_bias=False),
    "LlamaForCausalLM": dict(qk_norm=False, qkv_bias=None, o_bias=None),
    "MistralForCausalLM": dict(qk_norm=False, qkv_bias=False, o_bias=False),
    "GPTNeoXForCausalLM": dict(qk_norm=False, qkv_bias=None, o_bias=None),
    "Qwen3MoeForCausalLM": dict(qk_norm=True, qkv_bias=None, o_bias=None),
    "MixtralForCausalLM": dict(qk_norm=False, qkv_bias=False, o_bias=False),
}
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
# activations of the (non-gated) GPT-NeoX MLP -> torch's F.gelu `approximate`
GELU_ACTS = {"gelu": "none", "gelu_new": "tanh", "gelu_fast": "tanh", "gelu_pytorch_tanh": "tanh"}
# transformers' defaults per architecture for the keys read here (None: derived, see from_hf).
_QWEN = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
             num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=32768,
             use_sliding_window=False, sliding_window=4096, max_window_layers=28,
             bos_token_id=None, eos_token_id=None)
HF_DEFAULTS = {
    "LlamaForCausalLM": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                             num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=None,
                             head_dim=None, max_position_embeddings=2048, sliding_window=None,
                             bos_token_id=1, eos_token_id=2),
    "Qwen2ForCausalLM": dict(_QWEN, head_dim=None),
    "Qwen3ForCausalLM": dict(_QWEN, head_dim=128),
    "MistralForCausalLM": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=None, max_position_embeddings=4096 * 32, sliding_window=4096,
                               bos_token_id=1, eos_token_id=2),
    "GPTNeoXForCausalLM": dict(vocab_size=50432, hidden_size=6144, intermediate_size=24576,
                               num_hidden_layers=44, num_attention_heads=64, num_key_value_heads=None,
                               head_dim=None, max_position_embeddings=2048, sliding_window=None,
                               bos_token_id=0, eos_token_id=2, hidden_act="gelu",
                               attention_bias=True, use_parallel_residual=True,
                               layer_norm_eps=1e-5, rotary_pct=0.25, rotary_emb_base=10000.0),
    "Qwen3MoeForCausalLM": dict(_QWEN, hidden_size=2048, intermediate_size=6144,
                                num_hidden_layers=24, num_key_value_heads=4, head_dim=None,
                                num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                                norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=None),
    "MixtralForCausalLM": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                               head_dim=None, max_position_embeddings=4096 * 32, sliding_window=None,
                               bos_token_id=1, eos_token_id=2, num_local_experts=8,
                               num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6),
}
COMMON_DEFAULTS = dict(hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
                       attention_bias=False, mlp_bias=False, rope_theta=10000.0)
ROPE_TYPES = ("default", "linear", "llama3")
ROPE_REQUIRED = {"linear": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A decoder-only transformer with RMSNorm, RoPE, GQA attention and a SwiGLU MLP.

    rope_type "default" is plain RoPE; "linear" divides positions by `rope_factor`;
    "llama3" rescales low frequencies (Llama 3.1) using `rope_factor`, `rope_low_freq_factor`,
    `rope_high_freq_factor` and `rope_original_max_position`.
    `sliding_window` is the effective window (None = dense attention in every layer).
    `dtype`: the checkpoint's (config.json's dtype / torch_dtype; float32 when absent, as
    transformers loads it).

    GPT-NeoX: `norm` "layer" (LayerNorm with bias; its eps is `rms_norm_eps`),
    `parallel_residual` (x + attn(ln1(x)) + mlp(ln2(x))), RoPE on the first `rotary_dim`
    dims of each head only, `hidden_act` a GELU (non-gated MLP with biases).
    Mixture of experts: layers in `moe_layers` replace the MLP by `num_experts` SwiGLU experts
    of width `moe_intermediate_size`; each token goes to the `num_experts_per_tok` experts of
    highest router softmax, weighted by those probabilities (renormalized to sum 1 when
    `norm_topk_prob`: always for Mixtral, as config.json says for Qwen3-MoE).
    """
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    qk_norm: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    sliding_window: int | None = None
    dtype: str = "bfloat16"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: QuantConfig | None = None   # 4-bit linear layers (policy.quantization)
    hidden_act: str = "silu"
    norm: str = "rms"
    parallel_residual: bool = False
    rotary_dim: int = 0            # 0: the whole head
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    moe_layers: tuple[int, ...] = ()

    def __post_init__(self):
        _require(self.architecture in ARCHITECTURES,
                 f"unsupported architecture {self.architecture!r}; supported: "
                 f"{', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1,
                     f"model config {name} must be a positive integer, got {value!r}")
        _require(self.num_attention_heads % self.num_key_value_heads == 0,
                 f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                 f"num_key_value_heads ({self.num_key_value_heads})")
        _require(self.head_dim % 2 == 0, f"head_dim must be even for RoPE, got {self.head_dim}")
        _require(self.rms_norm_eps > 0, f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        _require(self.rope_theta > 0, f"rope_theta must be > 0, got {self.rope_theta}")
        _require(self.rope_type in ROPE_TYPES,
                 f"unsupported rope_scaling type {self.rope_type!r}; supported: {ROPE_TYPES}")
        _require(self.rope_factor > 0, f"rope_scaling factor must be > 0, got {self.rope_factor}")
        if self.rope_type == "llama3":
            _require(self.rope_high_freq_factor > self.rope_low_freq_factor,
                     "llama3 rope_scaling needs high_freq_factor > low_freq_factor, got "
                     f"{self.rope_high_freq_factor} and {self.rope_low_freq_factor}")
        _require(self.dtype in DTYPE_BYTES, f"unsupported dtype {self.dtype!r}; supported: "
                 f"{', '.join(DTYPE_BYTES)}")
        _require(0 <= self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0,
                 f"rotary_dim must be even and in [0, head_dim], got {self.rotary_dim}")
        if self.moe_layers:
            _require(1 <= self.num_experts_per_tok <= self.num_experts,
                     f"num_experts_per_tok ({self.num_experts_per_tok}) must be in "
                     f"[1, num_experts ({self.num_experts})]")
            _require(self.moe_intermediate_size >= 1, "moe_intermediate_size must be >= 1, got "
                     f"{self.moe_intermediate_size}")

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def rope_dim(self) -> int:
        """Dims of each head that RoPE rotates (GPT-NeoX: rotary_pct of the head)."""
        return self.rotary_dim or self.head_dim

    # ---- sizes ---------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def attention_matmul_params(self) -> int:
        """Weights of one layer's QKV and O projections."""
        h = self.hidden_size
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h

    @property
    def expert_params(self) -> int:
        """Weights of one expert (gate, up, down); 0 for dense models."""
        return 3 * self.hidden_size * self.moe_intermediate_size if self.is_moe else 0

    @property
    def dense_mlp_params(self) -> int:
        """Weights of one dense MLP (SwiGLU: gate/up/down; GPT-NeoX GELU: up/down)."""
        return (2 if self.norm == "layer" else 3) * self.hidden_size * self.intermediate_size

    @property
    def active_matmul_params(self) -> int:
        """Linear-layer weights one token multiplies with, all layers: QKV, O and the MLPs
        (for mixture-of-experts layers the router and the `num_experts_per_tok` experts)."""
        moe = len(self.moe_layers)
        mlp = (moe * (self.num_experts * self.hidden_size + self.num_experts_per_tok
                      * self.expert_params)
               + (self.num_hidden_layers - moe) * self.dense_mlp_params)
        return self.num_hidden_layers * self.attention_matmul_params + mlp

    @property
    def layer_matmul_params(self) -> int:
        """active_matmul_params of an average layer."""
        return self.active_matmul_params // self.num_hidden_layers

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in_features, out_features) of one layer's linear layers, as checkpoints store
        them (q, k, v, o, gate, up, down)."""
        h, q, kv, inter = self.hidden_size, self.q_size, self.kv_size, self.intermediate_size
        return [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]

    @property
    def layer_matmul_bytes(self) -> int:
        """Bytes of one layer's linear weights as stored: `dtype`, or 4-bit values plus group
        scales and zeros (and g_idx) when `quantization` says so."""
        if self.quantization is None:
            return self.layer_matmul_params * self.dtype_bytes
        return sum(self.quantization.weight_bytes(i, o) for i, o in self.linear_shapes)

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights as the checkpoint stores them: the linear layers (quantized
        or not: layer_matmul_bytes), the rest (embeddings, LM head, norms, biases) in `dtype`."""
        rest = self.num_params - self.num_hidden_layers * self.layer_matmul_params
        return self.num_hidden_layers * self.layer_matmul_bytes + rest * self.dtype_bytes

    @property
    def num_params(self) -> int:
        """All parameters (tied embeddings counted once), as transformers counts them."""
        h, moe = self.hidden_size, len(self.moe_layers)
        per_layer = self.attention_matmul_params + (4 if self.norm == "layer" else 2) * h
        if self.qkv_bias:
            per_layer += self.q_size + 2 * self.kv_size
        if self.o_bias:
            per_layer += h
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        mlp = (self.num_hidden_layers - moe) * self.dense_mlp_params
        if self.norm == "layer":   # GPT-NeoX MLP biases
            mlp += self.num_hidden_layers * (self.intermediate_size + h)
        mlp += moe * self.num_experts * (self.expert_params + h)   # experts + router
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        final_norm = (2 if self.norm == "layer" else 1) * h
        return self.num_hidden_layers * per_layer + mlp + embeddings + final_norm

    @property
    def num_active_params(self) -> int:
        """Parameters one token uses: all but the experts it is not routed to."""
        idle = self.num_experts - self.num_experts_per_tok
        return self.num_params - len(self.moe_layers) * idle * self.expert_params

    def experts_touched(self, num_tokens: int) -> float:
        """Expected distinct experts of one MoE layer that `num_tokens` tokens are routed to,
        if each token picks its k of E experts uniformly: E (1 - (1 - k/E)^tokens) (an expert
        escapes one token with probability 1 - k/E). k for one token, -> E for large batches.
        Skewed real routing touches fewer: an upper estimate. 0 for dense models."""
        if not self.is_moe:
            return 0.0
        return expected_experts_touched(self.num_experts, self.num_experts_per_tok, num_tokens)

    def matmul_weights_read(self, num_tokens: int) -> float:
        """Linear-layer weights (all layers) a forward of `num_tokens` tokens reads: all of
        them for a dense model; for a mixture of experts, all but the experts no token is
        routed to (expected: experts_touched)."""
        total = self.active_matmul_params
        if not self.is_moe:
            return float(total)
        moe = len(self.moe_layers)
        active = moe * self.num_experts_per_tok * self.expert_params
        return total - active + moe * self.experts_touched(num_tokens) * self.expert_params

    def num_kv_heads_per_rank(self, tp_size: int = 1) -> int:
        """KV heads each tensor-parallel rank holds (and caches). With fewer KV heads than
        ranks, each KV head is replicated on tp_size / num_key_value_heads ranks."""
        return max(1, self.num_key_value_heads // tp_size)

    def check_tp(self, tp_size: int) -> None:
        """Raise ValueError if the model cannot be split over `tp_size` ranks."""
        _require(isinstance(tp_size, int) and tp_size >= 1,
                 f"tensor_parallel_size must be a positive integer, got {tp_size!r}")
        names = ("num_attention_heads", "intermediate_size", "vocab_size")
        if self.is_moe:
            names += ("moe_intermediate_size",)
        for name in names:
            value = getattr(self, name)
            _require(value % tp_size == 0,
                     f"{name} ({value}) must be divisible by tensor_parallel_size ({tp_size})")
        kv = self.num_key_value_heads
        _require(kv % tp_size == 0 or tp_size % kv == 0,
                 f"num_key_value_heads ({kv}) and tensor_parallel_size ({tp_size}) must "
                 "divide one another")

    def kv_cache_bytes_per_token(self, dtype_bytes: int | None = None, tp_size: int = 1) -> int:
        """K and V bytes one token occupies on one rank, all layers."""
        return (2 * self.num_hidden_layers * self.num_kv_heads_per_rank(tp_size) * self.head_dim
                * (self.dtype_bytes if dtype_bytes is None else dtype_bytes))

    # ---- reading config.json ---------------------------------------------------------
    @classmethod
    def from_hf(cls, config: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict (transformers v4 keys `rope_theta` /
        `rope_scaling` / `torch_dtype`, or v5 keys `rope_parameters` / `dtype`); a missing
        key takes the architecture's transformers default. Raises ValueError for what the
        engine cannot run (other architectures, activations, biases, RoPE variants,
        experts outside Qwen3-MoE and Mixtral, quantization)."""
        archs = config.get("architectures") or []
        _require(len(archs) == 1, f"config.json must name one architecture, got {archs!r}")
        arch = archs[0]
        _require(arch in ARCHITECTURES, f"unsupported architecture {arch!r}; supported: "
                 f"{', '.join(ARCHITECTURES)}")
        d = {**COMMON_DEFAULTS, **HF_DEFAULTS[arch], **config}
        neox = arch == "GPTNeoXForCausalLM"
        if neox:
            _require(d["hidden_act"] in GELU_ACTS, f"GPT-NeoX hidden_act must be one of "
                     f"{list(GELU_ACTS)}, got {d['hidden_act']!r}")
        else:
            _require(d["hidden_act"] == "silu",
                     f"only hidden_act 'silu' is supported, got {d['hidden_act']!r}")
            _require(not d["mlp_bias"], "mlp_bias=true is not supported")
            _require(float(config.get("partial_rotary_factor", 1.0)) == 1.0,
                     "partial_rotary_factor != 1 is not supported")
        _require(arch in MOE_ARCHITECTURES
                 or not (config.get("num_experts") or config.get("num_local_experts")),
                 f"{arch} with experts is not supported (mixture-of-experts architectures: "
                 f"{', '.join(MOE_ARCHITECTURES)})")
        _require("quantization_config" not in config or not (neox or arch in MOE_ARCHITECTURES),
                 f"quantization_config: quantized {arch} checkpoints are not supported (GPTQ / AWQ "
                 "for the dense Llama / Qwen / Mistral architectures only)")
        flags = ARCHITECTURES[arch]
        heads = d["num_attention_heads"]
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        missing = [k for k in ROPE_REQUIRED.get(rope_type, ()) if k not in rope]
        _require(not missing, f"rope_scaling of type {rope_type!r} lacks {missing}")
        attention_bias = bool(d["attention_bias"])
        eos = d["eos_token_id"]
        return cls(
            architecture=arch,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d["num_key_value_heads"] or heads,
            head_dim=head_dim,
            rms_norm_eps=float(d["layer_norm_eps"] if neox else d["rms_norm_eps"]),
            rope_theta=float(config.get("rope_theta", rope.get(
                "rope_theta", d["rotary_emb_base"] if neox else d["rope_theta"]))),
            max_position_embeddings=d["max_position_embeddings"],
            tie_word_embeddings=bool(d["tie_word_embeddings"]),
            qk_norm=flags["qk_norm"],
            qkv_bias=attention_bias if flags["qkv_bias"] is None else flags["qkv_bias"],
            o_bias=attention_bias if flags["o_bias"] is None else flags["o_bias"],
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            sliding_window=_sliding_window(arch, d),
            dtype=str(config.get("dtype") or config.get("torch_dtype") or "float32"),
            bos_token_id=d["bos_token_id"],
            eos_token_ids=() if eos is None else tuple(eos) if isinstance(eos, list) else (eos,),
            quantization=(QuantConfig.from_hf(config["quantization_config"])
                          if "quantization_config" in config else None),
            hidden_act=d["hidden_act"],
            norm="layer" if neox else "rms",
            parallel_residual=bool(neox and d["use_parallel_residual"]),
            rotary_dim=int(head_dim * float(rope.get("partial_rotary_factor", d["rotary_pct"])))
            if neox else 0,
            **_moe_fields(arch, d),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "ModelConfig":
        """Read `path/config.json`."""
        file = Path(path) / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}")
        try:
            return cls.from_hf(json.loads(file.read_text()))
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None


def _moe_fields(arch: str, d: dict) -> dict:
    """The expert fields of ModelConfig: Mixtral's experts are intermediate_size wide, in
    every layer, top-k renormalized; Qwen3-MoE's are moe_intermediate_size wide in the layers
    l with (l + 1) % decoder_sparse_step == 0 and l not in mlp_only_layers."""
    if arch == "MixtralForCausalLM":
        return dict(num_experts=d["num_local_experts"], num_experts_per_tok=d["num_experts_per_tok"],
                    moe_intermediate_size=d["intermediate_size"], norm_topk_prob=True,
                    moe_layers=tuple(range(d["num_hidden_layers"])))
    if arch == "Qwen3MoeForCausalLM":
        step, dense = d["decoder_sparse_step"], set(d["mlp_only_layers"] or ())
        _require(isinstance(step, int) and step >= 1,
                 f"decoder_sparse_step must be a positive integer, got {step!r}")
        layers = tuple(i for i in range(d["num_hidden_layers"])
                       if i not in dense and d["num_experts"] > 0 and (i + 1) % step == 0)
        return dict(num_experts=d["num_experts"], num_experts_per_tok=d["num_experts_per_tok"],
                    moe_intermediate_size=d["moe_intermediate_size"],
                    norm_topk_prob=bool(d["norm_topk_prob"]), moe_layers=layers)
    return {}


QWEN_SLIDING = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


def _sliding_window(arch: str, d: dict) -> int | None:
    """The window of the layers that slide, or None when every layer is dense: Qwen2/3
    switch it on with use_sliding_window for layers >= max_window_layers (or as layer_types
    says); Mistral slides in every layer whenever sliding_window is set."""
    window = d.get("sliding_window")
    if arch in QWEN_SLIDING and not d.get("use_sliding_window"):
        window = None
    if window is None:
        return None
    layer_types = d.get("layer_types")
    if layer_types is None and arch in QWEN_SLIDING:
        layer_types = ["sliding_attention" if i >= d["max_window_layers"] else "full_attention"
                       for i in range(d["num_hidden_layers"])]
    if layer_types is not None:
        unknown = set(layer_types) - {"full_attention", "sliding_attention"}
        _require(not unknown, f"unsupported layer_types {sorted(unknown)}")
        if "sliding_attention" not in layer_types:
            return None
    return int(window)


def expected_experts_touched(num_experts: int, top_k: int, num_tokens: float) -> float:
    """Expected distinct experts of E = `num_experts` that `num_tokens` tokens, each routed
    uniformly to k = `top_k` of them, touch: E (1 - (1 - k/E)^tokens); 0 for no tokens."""
    if num_tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** num_tokens)
