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

A plan has a section per start-up choice; a quantized or mixture-of-experts engine makes
two more than a bf16 dense one, pinned the same way (a plan with only "skinny", as written
before the other two existed, still pins a bf16 dense model):

- skinny  per dense layer group (output x input features, dtype, bias, and whether the layer
          takes SiLU-and-mul or an RMSNorm in its prologue) and row count M: (M, split_k or 0
          for cuBLAS) (engine.kernels.skinny_gemm.choose_skinny_gemm);
- w4a16   per 4-bit layer group (shape, format gptq / awq, group size, act-order, zero offset,
          bias, activation dtype) and row count M: the Launch (kernel kind, tile, warps,
          stages, K split, PDL mode) as plain json (engine.kernels.w4a16.choose_w4a16); read
          back, the layers are repacked and every launch run once (compiled, the split-K
          workspace and the dequantization scratch sized: w4a16.prepare_w4a16), nothing timed;
- moe     per fused MoE layer group (w13 and w2 shapes, dtype, top-k) and token-count bucket:
          rows per block and each grouped GEMM's tiles (engine.kernels.fused_moe.
          choose_moe_tiles);
- decode  the split-KV rule of the decode attention (policy.decode_plan.KERNEL_RULE_FIELDS:
          shortest share, programs per SM, ...), which is not timed but changes between
          engine versions: a calibration records it as its `decode_plan` and prices every step
          by it, so an engine pinned to that calibration cuts its decode attention as the
          profiled one did. A plan or calibration without one runs the engine's own rule.

A plan whose layer groups do not match the model's (another model, tensor-parallel size,
quantization format, group size, act-order, top-k) is refused in one line naming what differs.
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


def snapshot(model: torch.nn.Module, device: str, device_type: str = "cuda", decode=None) -> dict:
    """The plan `model`'s layers run now (set by the timed choices or by `apply`): "skinny"
    always (empty plans where none was chosen), "w4a16" / "moe" where a 4-bit / fused MoE
    layer has a plan, "decode" where `decode` (the runner's DecodePlan) is given."""
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
    plan = {"format": FORMAT, "device": device, "skinny": groups}
    w4a16 = {name: {**fields, "plan": [[m, launch._asdict()] for m, launch in getattr(layers[0], "w4a16", ())]}
             for name, (fields, layers) in _w4a16_groups(model).items()}
    if any(entry["plan"] for entry in w4a16.values()):   # set by the choice or by `apply`
        plan["w4a16"] = w4a16
    moe = {name: {**fields, "plan": [[tokens, _tiles_json(tiles)] for tokens, tiles in layers[0].moe_tiles]}
           for name, (fields, layers) in _moe_groups(model, device_type).items()}
    if any(entry["plan"] for entry in moe.values()):
        plan["moe"] = moe
    if decode is not None:
        plan["decode"] = decode.kernel_rule()
    return plan


def describe(plan: dict) -> dict[str, str]:
    """A plan at a glance, per layer shape and row count: {"<out>x<in>/m<rows>": "torch" |
    "split<k>", with "+swiglu<k>" / "+norm<k>" where that prologue runs inside the kernel;
    "w4a16 <group>/m<rows>": the launch (w4a16.launch_name); "moe <group>/t<tokens>": rows
    per block and the two GEMMs' tiles} (benchmarks/fidelity/probe_engines.py compares
    engines by it)."""
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
    if plan.get("w4a16"):
        from engine.kernels.w4a16 import launch_name
        for name, entry in plan["w4a16"].items():
            for m, launch in entry["plan"]:
                out[f"w4a16 {name}/m{m}"] = launch_name(_launch(launch, name, "?"))
    for name, entry in (plan.get("moe") or {}).items():
        for tokens, tiles in entry["plan"]:
            out[f"moe {name}/t{tokens}"] = (f"m{tiles['block_m']} gate_up {_tiles_str(tiles['gate_up'])}"
                                          f" down {_tiles_str(tiles['down'])}")
    if plan.get("decode"):
        out["decode"] = " ".join(f"{f}={v}" for f, v in plan["decode"].items())
    return out


PARTS = ("skinny", "w4a16", "moe")


def apply(model: torch.nn.Module, plan: dict, device: str, source: str,
          device_type: str = "cuda", parts=PARTS, pdl_rows: int = 0) -> None:
    """Set the start-up choices `parts` names (those the engine would time: skinny where it
    runs the skinny GEMM, w4a16 and moe where it runs Triton kernels) from `plan` (see
    `read`); times nothing. Raises ValueError, in one line naming `source`, when the plan was
    made on another device, or its layer groups do not match this model's (see module doc).
    pdl_rows: EngineConfig.pdl_max_tokens where the engine launches with PDL, else 0 (the
    W4A16 launches are compiled as the steps run them)."""
    if plan.get("device") != device:
        raise ValueError(f"kernel plan {source} was made on {plan.get('device')!r}, this engine "
                         f"runs on {device!r}: time a plan here (name a new file)")
    if "skinny" in parts:
        _apply_skinny(model, plan, source, device_type)
    if "w4a16" in parts:
        _apply_w4a16(model, plan, source, pdl_rows)
    if "moe" in parts:
        _apply_moe(model, plan, source, device_type)


def _apply_skinny(model, plan, source, device_type):
    from engine.kernels.skinny_gemm import skinny_layers
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


def _apply_w4a16(model, plan, source, pdl_rows):
    from engine.kernels import w4a16
    from engine.layers.quant import repack_layers
    if getattr(model, "quantization", None) is not None:
        repack_layers(model)   # as the timed choice does first: the launches are for that layout
    model_groups = _w4a16_groups(model)
    entries = _match("W4A16", model_groups, plan.get("w4a16") or {}, source)
    for name, (fields, layers) in model_groups.items():
        launches = tuple((int(m), _launch(launch, name, source)) for m, launch in entries[name]["plan"])
        for layer in layers:
            layer.w4a16 = launches
    w4a16.prepare_w4a16(model, pdl_rows)


def _apply_moe(model, plan, source, device_type):
    from engine.kernels.fused_moe import MoeTiles, Tiles
    model_groups = _moe_groups(model, device_type)
    entries = _match("MoE", model_groups, plan.get("moe") or {}, source)
    for name, (fields, layers) in model_groups.items():
        try:
            tiles = tuple((int(t), MoeTiles(int(c["block_m"]), Tiles(**c["gate_up"]), Tiles(**c["down"])))
                          for t, c in entries[name]["plan"])
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"kernel plan {source}: MoE layer group {name} has a malformed tile "
                             f"entry ({type(e).__name__}: {e})") from None
        for layer in layers:
            layer.moe_tiles = tiles


def _match(kind: str, model_groups: dict, plan_groups: dict, source: str) -> dict:
    """plan_groups, checked to hold exactly model_groups' layer groups ({name: (fields,
    layers)}) with the same fields; else ValueError in one line naming what differs."""
    for name, (fields, _) in model_groups.items():
        entry = plan_groups.get(name)
        if entry is not None and all(entry.get(f) == v for f, v in fields.items()):
            continue
        shape = fields["shape"]
        alike = name if entry else next((n for n, e in plan_groups.items() if e.get("shape") == shape), None)
        if alike is not None:
            diff = ", ".join(f"{f} {plan_groups[alike].get(f)!r} in the plan, {v!r} here"
                             for f, v in fields.items() if plan_groups[alike].get(f) != v)
            diff = diff or f"layout ({alike} in the plan, {name} here)"
            raise ValueError(f"kernel plan {source}: its {kind} layers of shape {shape} differ from "
                             f"this model's in {diff}: time a plan for this model (name a new file)")
        raise ValueError(f"kernel plan {source} has no {kind} layer group {name} (another model or "
                         f"tensor_parallel_size?); it has {sorted(plan_groups) or 'none'}")
    extra = sorted(set(plan_groups) - set(model_groups))
    if extra:
        raise ValueError(f"kernel plan {source} has {kind} layer groups this model lacks: {extra} "
                         f"(a plan of another model?); this model has {sorted(model_groups) or 'none'}")
    return plan_groups


def _w4a16_groups(model) -> dict[str, tuple[dict, list]]:
    """name -> (fields that must match, the 4-bit layers of that group) (engine.kernels.
    w4a16.quantized_layers' grouping, named by the layers' quantization_config)."""
    if getattr(model, "quantization", None) is None:
        return {}
    from engine.kernels.w4a16 import activation_dtype, quantized_layers
    dtype = str(activation_dtype(model)).removeprefix("torch.")
    groups = {}
    for (n, k, _, group_size, scattered, zero_offset, bias), layers in quantized_layers(model).items():
        q = layers[0].quant
        fields = {"shape": [n, k], "format": q.method, "group_size": group_size,
                  "act_order": q.desc_act, "zero_offset": zero_offset, "bias": bias, "dtype": dtype}
        flags = [f for f, on in (("act_order", q.desc_act), ("scattered", scattered),
                                 (f"zero{zero_offset}", zero_offset), ("bias", bias)) if on]
        groups["/".join([f"{n}x{k}", q.method, f"g{group_size}"] + flags + [dtype])] = fields, layers
    return groups


def _moe_groups(model, device_type) -> dict[str, tuple[dict, list]]:
    """name -> (fields that must match, the fused MoE layers of that group)
    (engine.kernels.fused_moe.moe_layers)."""
    if not any(getattr(m, "fused", False) and hasattr(m, "moe_tiles") for m in model.modules()):
        return {}
    from engine.kernels.fused_moe import moe_layers
    groups = {}
    for (w13, w2, dtype, top_k), layers in moe_layers(model, device_type).items():
        dtype = str(dtype).removeprefix("torch.")
        fields = {"shape": list(w13), "w2": list(w2), "top_k": top_k, "dtype": dtype}
        groups[f"{'x'.join(map(str, w13))}/top{top_k}/{dtype}"] = fields, layers
    return groups


def _launch(fields: dict, name: str, source: str):
    """A W4A16 Launch read back from its json form; ValueError in one line where it is none."""
    from engine.kernels.w4a16 import Launch, max_rows
    try:
        launch = Launch(**fields)
    except TypeError as e:
        raise ValueError(f"kernel plan {source}: W4A16 layer group {name} has a malformed launch "
                         f"{fields!r} ({e})") from None
    if launch.kind not in ("tiled", "dequant") and max_rows(launch) == float("inf"):
        raise ValueError(f"kernel plan {source}: W4A16 layer group {name} has a launch of unknown "
                         f"kind {launch.kind!r}")
    return launch


def _tiles_json(tiles) -> dict:
    import dataclasses
    return dataclasses.asdict(tiles)


def _tiles_str(t: dict) -> str:
    return f"{t['block_n']}x{t['block_k']}w{t['num_warps']}s{t['num_stages']}"


def _load(path: str):
    """The JSON in `path`, or None where the file does not exist yet; ValueError in one line
    for a file that is not readable JSON."""
    p = Path(path)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"kernel plan {path}: not readable JSON ({e})") from None


def read(path: str) -> dict | None:
    """The plan in `path` (a plan file, or a calibration's `kernel_plan`), or None where the
    file does not exist yet. Raises ValueError for a file that is neither."""
    data = _load(path)
    if data is None:
        return None
    data = data.get("kernel_plan", data) if isinstance(data, dict) else data
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"kernel plan {path}: not a {FORMAT} file, nor a calibration that "
                         "records one (calibrations made before session 8 do not)")
    return data


def read_decode_rule(path: str | None) -> dict | None:
    """The split-KV rule `path` pins ({field: value} over policy.decode_plan.KERNEL_RULE_FIELDS):
    a plan file's "decode", a calibration's `decode_plan` (the rule of the engine it profiled);
    None where there is no file, or it records no rule (the engine's own then runs). Raises
    ValueError in one line for a rule with unknown or missing fields."""
    data = _load(path) if path else None
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"kernel plan {path}: not a {FORMAT} file, nor a calibration")
    rule = data.get("decode") if data.get("format") == FORMAT else data.get("decode_plan")
    if not rule:
        return None
    from policy.decode_plan import KERNEL_RULE_FIELDS, RULE_FIELDS
    unknown = sorted(set(rule) - set(RULE_FIELDS) - {"num_kv_heads", "num_sms"})
    missing = [f for f in KERNEL_RULE_FIELDS if f not in rule]
    if unknown or missing:
        raise ValueError(f"kernel plan {path}: its decode rule has unknown fields {unknown} / lacks "
                         f"{missing} (fields: {list(KERNEL_RULE_FIELDS)})")
    return {f: rule[f] for f in KERNEL_RULE_FIELDS}


def write(path: str, plan: dict) -> None:
    """Write `plan` atomically (a concurrent reader sees the whole file or none)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(plan, indent=1) + "\n")
    tmp.replace(p)
