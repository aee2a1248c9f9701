"""RMSNorm, optionally fused with the residual add that precedes it."""
import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in float32 and cast back (as in
    Hugging Face transformers, so bf16 results match it).

    forward(x) -> y; forward(x, residual) -> (y, x + residual): the sum is the residual
    stream the next layer adds to, so the add and the norm read x once.
    """

    fused = False   # build_model sets it: one Triton kernel (engine.kernels.fused) on [T, N] inputs

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.fused:
            from engine.kernels.fused import add_rmsnorm
            if x.dim() != 2:   # q/k norms see [T, heads, D]
                return add_rmsnorm(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
            return add_rmsnorm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
