"""The kernels' shared per-device buffers (split-K workspace, dequantization scratch, merge
tickets) outlive every engine but the last on their device: while one holds them, another's
release keeps them (its graphs may still use their addresses); the last release drops them, so
the next engine in the process starts without them."""
import importlib

import torch

from engine.kernels import buffers, skinny_gemm, w4a16

paged_attention = importlib.import_module("engine.kernels.paged_attention")   # the package exports a function of that name


def current(device):
    return (skinny_gemm.workspace(device, 16, 1)[0], w4a16.scratch(device, torch.float32, 16),
            paged_attention._tickets(device, 16))


def test_buffers_live_until_their_last_holder_lets_go():
    device = torch.device("cpu")
    buffers.hold(device)
    buffers.hold(device)
    made = (skinny_gemm.workspace(device, 4096, 8)[0], w4a16.scratch(device, torch.float32, 4096),
            paged_attention._tickets(device, 8192))
    buffers.release(device)
    assert all(a is b for a, b in zip(current(device), made))       # one holder left: kept
    buffers.release(device)
    assert all(a is not b for a, b in zip(current(device), made))   # the last let go: dropped
    assert current(device)[0].numel() < 4096 and current(device)[2].numel() < 8192
    buffers.hold(device)
    buffers.release(device)    # leaves the module state as it found it: nothing held


def test_outgrown_buffers_are_kept_until_released():
    device = torch.device("cpu")
    buffers.hold(device)
    small = skinny_gemm.workspace(device, 64, 1)[0]
    grown = skinny_gemm.workspace(device, 1 << 16, 1)[0]
    assert grown is not small and any(t is small for t in skinny_gemm._RETIRED[device])
    buffers.release(device)
    assert device not in skinny_gemm._RETIRED and device not in skinny_gemm._WORKSPACES
