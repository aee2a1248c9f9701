"""Programmatic dependent launch (PDL, sm_90+): the next kernel of a step starts while this
one finishes, instead of after it.

At batch 1 a decode layer is ~10 kernels of 1-6 us, each mostly launch, ramp-up and the
latency of its first loads: the bytes themselves take a fraction of that. Launched with
PDL, kernel N+1's programs are scheduled as soon as every program of kernel N has passed
its `enter`; they do what needs no result of kernel N (compute offsets, start pulling their
weights from HBM into L2 with `prefetch_rows_l2`), then wait in their own `enter` until
kernel N has completed and its writes are visible. A CUDA graph captures the launches with their
programmatic edges, so replays keep the overlap.

The contract of a kernel launched with `launch_kwargs()` (PDL constexpr true):
  - before `enter(PDL)` it reads only memory that no kernel of the step writes (weights,
    norms, step inputs uploaded before the step) and writes nothing;
  - it calls `enter(PDL)` (wait, then let the next kernel start) before any other load or
    store.
By induction every earlier kernel has completed when a kernel passes its wait (kernel N
triggers only after its own wait, which needed kernel N-1 complete), so the order of every
read-after-write and write-after-read in the step is the plain stream order's. Kernels
launched without PDL (torch ops, cuBLAS, NCCL) keep full stream order around them.

Off on the interpreter (TRITON_INTERPRET=1: the CPU tests), on CPUs and before sm_90, and
when EngineConfig.pdl is false: then the constexpr is false, the calls compile to nothing
and the launch carries no attribute.
"""
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
_enabled = False


def supported(device: torch.device) -> bool:
    """PDL needs a CUDA device of compute capability 9.0 or later and compiled kernels."""
    return (not _INTERPRETED and device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def enable(on: bool) -> None:
    """Process-wide switch (the engine sets it from EngineConfig.pdl at start): launches
    after this call use PDL if `on`. Graphs captured before keep what they captured."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    """The PDL constexpr for a launch now."""
    return _enabled


def launch_kwargs() -> dict:
    """Extra arguments of a `kernel[grid](...)` call: the launch attribute when enabled."""
    return {"launch_pdl": True} if _enabled else {}


@triton.jit
def enter(PDL: tl.constexpr):
    """The contract's turn, in its order: block until the previous kernel has completed and
    its writes are visible, then let the next kernel's programs start (once every program
    of this one has got here)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_rows_l2(row_ptrs, nbytes, PDL: tl.constexpr):
    """Ask for `nbytes` (a multiple of 16) from each of `row_ptrs` (16-byte aligned) to be
    brought into L2 (one bulk prefetch per row: a hint, no registers, nothing waits on it).
    Meant for the weights a program will stream after `enter`."""
    if PDL:
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
                                  "=r,l,r", [row_ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)
