"""Rotary position embedding (RoPE), GPT-NeoX layout: a head's first half and second half
form the rotated pairs (dimension i pairs with i + head_dim/2)."""
import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """theta^(-2i/head_dim) for i in [0, head_dim/2), float32."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_position: int) -> torch.Tensor:
    """Llama 3.1 frequency scaling: wavelengths longer than original_max/low_freq_factor
    are stretched by `factor`, shorter than original_max/high_freq_factor are kept, and
    the band between is interpolated smoothly."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position / low_freq_factor
    high_freq_wavelen = original_max_position / high_freq_factor
    smooth = ((original_max_position / wavelen - low_freq_factor)
              / (high_freq_factor - low_freq_factor))
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    in_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(in_band, mid, scaled)


class RotaryEmbedding(nn.Module):
    """Rotates q and k by their token positions, from a cos/sin table precomputed in
    float32 for positions [0, max_position). The table is a non-persistent buffer (never in
    a checkpoint); cos/sin are cast to q's dtype before use, as Hugging Face does.

    forward(positions [T], q [T, H, D], k [T, Hkv, D]) -> (q, k) rotated (new tensors).
    """

    def __init__(self, head_dim: int, max_position: int, theta: float, rope_type: str = "default",
                 factor: float = 1.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                 original_max_position: int = 8192):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta)
        if rope_type == "linear":
            inv_freq = inv_freq / factor  # same as dividing positions by factor
        elif rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, factor, low_freq_factor, high_freq_factor,
                                       original_max_position)
        elif rope_type != "default":
            raise ValueError(f"unsupported rope_type {rope_type!r}")
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
        self.max_position = max_position
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, D/2], broadcast over heads
        sin = self.sin[positions].unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
