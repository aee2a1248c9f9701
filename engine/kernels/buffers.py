"""The lifetime of the kernels' per-device buffers: skinny_gemm's split-K workspace, w4a16's
dequantization scratch and paged_attention's merge tickets. Each module keeps one buffer per
device, shared by every engine on it and grown, never freed while in use, because a CUDA graph
keeps the addresses it captured. A ModelRunner on a CUDA device holds the device's buffers from
its start (`hold`) and lets go when released (`release`); the last to let go drops them, so a
later engine in the same process sizes its KV pool without them. Without this, a bf16 engine's
buffers (~0.2 GB) outlived it and kept 1.7 GB of torch's cached segments from the next engine's
pool (benchmarks/README.md, session 22). Torch-free at import: Triton loads only on release.
"""
import importlib
from collections import Counter

_HOLDERS: Counter = Counter()


def hold(device) -> None:
    _HOLDERS[device] += 1


def release(device) -> None:
    """One holder of `device`'s buffers lets go; the last drops them (its graphs are gone)."""
    _HOLDERS[device] -= 1
    if _HOLDERS[device] <= 0:
        del _HOLDERS[device]
        # by module path: the package also exports a function named paged_attention
        for name in ("paged_attention", "skinny_gemm", "w4a16"):
            importlib.import_module(f"engine.kernels.{name}").drop_buffers(device)
