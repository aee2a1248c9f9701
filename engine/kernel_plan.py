"""The engine's start-up kernel choice, written down and read back (EngineConfig.kernel_plan).

At start the engine times, per linear layer shape and row count, cuBLAS against its skinny
GEMM and the fused prologues (engine.kernels.skinny_gemm.choose_skinny_gemm), and keeps the
fastest. Many of those timings are within a few percent of each other, so two engines of one
commit on one GPU can choose differently and run the same step at different speeds: in
session 8 a Llama-3.1-8B decode step of one CUDA-graph size ran up to 20% apart between a
calibration's profile and a fidelity run. A plan pins the choice:

- `kernel_plan` names a file that does not exist: the engine times as usual and writes it;
- it names a plan file, or a calibration (which records its engine's plan): the engine reads
  the choice from it and times nothing, so it runs the kernels that file's engine ran.

The plan is per layer group (output x input features, dtype, bias, and whether the layer takes
SiLU-and-mul or an RMSNorm in its prologue) and row count: (M, split_k or 0 for cuBLAS).
"""

import json
import os
from pathlib import Path

import torch

FORMAT = "twinserve-kernel-plan/1"


def group_key(n: int, k: int, dtype: torch.dtype, has_bias: bool, swiglu: bool, norm: bool) -> str:
    """One layer group's name in a plan, e.g. "4096x1024/bfloat16/norm"."""
    flags = [f for f, on in (("bias", has_bias), ("swiglu", swiglu), ("norm", norm)) if on]
    return "/".join([f"{n}x{k}", str(dtype).removeprefix("torch.")] + flags)


def snapshot(model: torch.nn.Module, device: str, device_type: str = "cuda") -> dict:
    """The skinny-GEMM plan `model`'s layers run now (set by choose_skinny_gemm or `apply`)."""
    from engine.kernels.skinny_gemm import skinny_layers
    groups = {}
    for key, layers in skinny_layers(model, device_type).items():
        layer = layers[0]
        entry = {"plan": [list(p) for p in layer.skinny]}
        if key[4]:
            entry["swiglu"] = [list(p) for p in layer.skinny_swiglu]
        if key[5]:
            entry["norm"] = [list(p) for p in layer.skinny_norm]
        groups[group_key(*key)] = entry
    return {"format": FORMAT, "device": device, "skinny": groups}


def describe(plan: dict) -> dict[str, str]:
    """A plan at a glance, per layer shape and row count: {"<out>x<in>/m<rows>": "torch" |
    "split<k>", with "+swiglu<k>" / "+norm<k>" where that prologue runs inside the kernel}
    (benchmarks/fidelity/probe_engines.py compares engines by it)."""
    out = {}
    for name, entry in plan["skinny"].items():
        shape = name.split("/")[0]
        fused = {f: dict(map(tuple, entry.get(f, []))) for f in ("swiglu", "norm")}
        for m, split in entry["plan"]:
            choice = f"split{split}" if split else "torch"
            for f, splits in fused.items():
                if splits.get(m):
                    choice += f"+{f}{splits[m]}"
            out[f"{shape}/m{m}"] = choice
    return out


def apply(model: torch.nn.Module, plan: dict, device: str, source: str,
          device_type: str = "cuda") -> None:
    """Set every skinny-GEMM layer's plan from `plan` (see `read`). Raises ValueError, in one
    line naming `source`, when the plan was made on another device or lacks a layer group of
    this model (a plan of another model or tensor-parallel size)."""
    from engine.kernels.skinny_gemm import skinny_layers
    if plan.get("device") != device:
        raise ValueError(f"kernel plan {source} was made on {plan.get('device')!r}, this engine "
                         f"runs on {device!r}: time a plan here (name a new file)")
    groups = plan.get("skinny") or {}
    for key, layers in skinny_layers(model, device_type).items():
        name = group_key(*key)
        if name not in groups:
            raise ValueError(f"kernel plan {source} has no layer group {name} (another model or "
                             f"tensor_parallel_size?); it has {sorted(groups)}")
        entry = groups[name]
        for layer in layers:
            layer.skinny = tuple(tuple(p) for p in entry["plan"])
            if key[4]:
                layer.skinny_swiglu = tuple(tuple(p) for p in entry.get("swiglu", []))
            if key[5]:
                layer.skinny_norm = tuple(tuple(p) for p in entry.get("norm", []))


def read(path: str) -> dict | None:
    """The plan in `path` (a plan file, or a calibration's `kernel_plan`), or None where the
    file does not exist yet. Raises ValueError for a file that is neither."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"kernel plan {path}: not readable JSON ({e})") from None
    data = data.get("kernel_plan", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"kernel plan {path}: not a {FORMAT} file, nor a calibration that "
                         "records one (calibrations made before session 8 do not)")
    return data


def write(path: str, plan: dict) -> None:
    """Write `plan` atomically (a concurrent reader sees the whole file or none)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plan, indent=1) + "\n")
    tmp.replace(p)
