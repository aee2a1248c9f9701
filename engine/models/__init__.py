"""Model definitions: `ModelConfig` (from a Hugging Face config.json) and `build_model`."""
from contextlib import contextmanager, nullcontext

import torch

from engine.layers.activation import SiluAndMul
from engine.layers.attention import resolve_backend
from engine.layers.layernorm import RMSNorm
from engine.layers.moe import FusedMoE
from engine.layers.quant import dense_weights_on_meta, quantize_linears
from engine.models.config import ModelConfig
from engine.models.gpt_neox import GPTNeoXForCausalLM
from engine.models.transformer import CausalLM, DecoderAttention

__all__ = ["CausalLM", "ModelConfig", "build_model", "resolve_dtype"]


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch.bfloat16 or "bfloat16" / "bf16" / "float16" / "half" / "float32" / "float"."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    value = names.get(dtype) or getattr(torch, str(dtype), None)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r}")
    return value


@contextmanager
def _default_dtype(dtype: torch.dtype):
    # parameters are created directly in the target dtype (an fp32 detour would need twice
    # the memory); the previous default is always restored
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(cfg: ModelConfig, dtype: torch.dtype | str = torch.bfloat16,
                device: torch.device | str = "cpu", tp_rank: int = 0, tp_size: int = 1,
                attention_backend: str = "torch", max_model_len: int | None = None,
                fused: bool | None = None) -> CausalLM:
    """Build this rank's shard of the model on `device`, weights uninitialized (load them
    with engine.loader.load_weights).

    attention_backend: "torch" | "triton" | "flash_attn" | "flashinfer" | "auto" (triton on
        CUDA, torch on CPU). flashinfer also needs a per-step plan (engine.model_runner).
    max_model_len: cap on positions, to size the RoPE table (default: the config's
        max_position_embeddings).
    fused: the elementwise layers (residual + RMSNorm, q/k-norm + RoPE + KV store, SiLU-and-mul)
        as Triton kernels (engine.kernels.fused), and mixture-of-experts layers as the fused
        grouped GEMM (engine.kernels.fused_moe); None = wherever the attention backend is not
        "torch" (the torch backend is the pure-torch reference path).
    """
    device = torch.device(device)
    backend = resolve_backend(attention_backend, device)
    max_position = max_model_len or cfg.max_position_embeddings
    if fused is None:
        fused = backend != "torch"
    if cfg.sliding_window is not None and max_position > cfg.sliding_window:
        raise ValueError(f"{cfg.architecture} uses sliding-window attention "
                         f"({cfg.sliding_window} tokens), which is not implemented; set "
                         f"max_model_len <= {cfg.sliding_window}")
    quantized = cfg.quantization is not None   # 4-bit GPTQ / AWQ linear layers
    model_class = GPTNeoXForCausalLM if cfg.architecture == "GPTNeoXForCausalLM" else CausalLM
    with (_default_dtype(resolve_dtype(dtype)), device,
          dense_weights_on_meta() if quantized else nullcontext()):
        model = model_class(cfg, max_position, backend, tp_rank, tp_size)
        if quantized:
            quantize_linears(model, cfg.quantization)
    if fused:
        for module in model.modules():
            if isinstance(module, (RMSNorm, SiluAndMul, DecoderAttention, FusedMoE)):
                module.fused = True
    return model.eval()
