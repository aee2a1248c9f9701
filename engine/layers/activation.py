"""The SwiGLU activation of the fused gate_up projection."""
import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x = [gate | up] along the last dim -> silu(gate) * up (half the width)."""

    fused = False   # build_model sets it: one Triton kernel (engine.kernels.fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from engine.kernels.fused import silu_and_mul
            return silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
