"""`ModelConfig`: the architecture facts the engine needs, read from a Hugging Face
config.json. One generic decoder covers the supported architectures; what tells them apart
is a handful of flags (q/k RMSNorm, q/k/v bias, RoPE scaling)."""
import json
from dataclasses import dataclass
from pathlib import Path

# What sets each architecture apart; a bias of None follows config.json's attention_bias.
# Qwen2 hard-wires q/k/v biases and never has an o_proj bias; Llama and Qwen3 put
# `attention_bias` on all four projections; Mistral has no biases; Qwen3 RMS-normalizes
# each head of q and k before RoPE.
ARCHITECTURES = {
    "Qwen3ForCausalLM": dict(qk_norm=True, qkv_bias=None, o_bias=None),
    "Qwen2ForCausalLM": dict(qk_norm=False, qkv_bias=True, o_bias=False),
    "LlamaForCausalLM": dict(qk_norm=False, qkv_bias=None, o_bias=None),
    "MistralForCausalLM": dict(qk_norm=False, qkv_bias=False, o_bias=False),
}
ROPE_TYPES = ("default", "linear", "llama3")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """A decoder-only transformer with RMSNorm, RoPE, GQA attention and a SwiGLU MLP.

    rope_type "default" is plain RoPE; "linear" divides positions by `rope_factor`;
    "llama3" rescales low frequencies (Llama 3.1) using `rope_factor`, `rope_low_freq_factor`,
    `rope_high_freq_factor` and `rope_original_max_position`.
    `sliding_window` is the effective window (None = dense attention).
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

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def num_kv_heads_per_rank(self, tp_size: int = 1) -> int:
        """KV heads each tensor-parallel rank holds (and caches). With fewer KV heads than
        ranks, each KV head is replicated on tp_size / num_key_value_heads ranks."""
        return max(1, self.num_key_value_heads // tp_size)

    def check_tp(self, tp_size: int) -> None:
        """Raise ValueError if the model cannot be split over `tp_size` ranks."""
        _require(isinstance(tp_size, int) and tp_size >= 1,
                 f"tensor_parallel_size must be a positive integer, got {tp_size!r}")
        for name in ("num_attention_heads", "intermediate_size", "vocab_size"):
            value = getattr(self, name)
            _require(value % tp_size == 0,
                     f"{name} ({value}) must be divisible by tensor_parallel_size ({tp_size})")
        kv = self.num_key_value_heads
        _require(kv % tp_size == 0 or tp_size % kv == 0,
                 f"num_key_value_heads ({kv}) and tensor_parallel_size ({tp_size}) must "
                 "divide one another")

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2, tp_size: int = 1) -> int:
        """K and V bytes one token occupies on one rank, all layers."""
        return (2 * self.num_hidden_layers * self.num_kv_heads_per_rank(tp_size)
                * self.head_dim * dtype_bytes)

    @classmethod
    def from_hf(cls, config: dict) -> "ModelConfig":
        """Read a Hugging Face config.json dict (transformers v4 keys `rope_theta` /
        `rope_scaling` / `torch_dtype`, or v5 keys `rope_parameters` / `dtype`)."""
        archs = config.get("architectures") or []
        _require(len(archs) == 1, f"config.json must name one architecture, got {archs!r}")
        arch = archs[0]
        _require(arch in ARCHITECTURES, f"unsupported architecture {arch!r}; supported: "
                 f"{', '.join(ARCHITECTURES)}")
        flags = ARCHITECTURES[arch]
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in config]
        _require(not missing, f"config.json for {arch} lacks {missing}")
        _require(config.get("hidden_act", "silu") == "silu",
                 f"only hidden_act 'silu' is supported, got {config.get('hidden_act')!r}")
        _require(not config.get("mlp_bias", False), "mlp_bias=true is not supported")

        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope_theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        attention_bias = bool(config.get("attention_bias", False))
        window = config.get("sliding_window")
        if not config.get("use_sliding_window", arch == "MistralForCausalLM"):
            window = None  # Qwen2/3 carry a window size but switch it off
        eos = config.get("eos_token_id")
        eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
        heads = config["num_attention_heads"]
        return cls(
            architecture=arch,
            vocab_size=config["vocab_size"],
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_hidden_layers=config["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qk_norm=flags["qk_norm"],
            qkv_bias=attention_bias if flags["qkv_bias"] is None else flags["qkv_bias"],
            o_bias=attention_bias if flags["o_bias"] is None else flags["o_bias"],
            rope_type=rope_type,
            rope_factor=float(rope.get("factor", 1.0)),
            rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            rope_original_max_position=int(rope.get("original_max_position_embeddings", 8192)),
            sliding_window=window,
            dtype=str(config.get("dtype") or config.get("torch_dtype") or "bfloat16"),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
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
