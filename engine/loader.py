"""Load a Hugging Face safetensors checkpoint into a built model.

Files are read one at a time and tensors one at a time (safe_open), so the whole
checkpoint is never in memory. A checkpoint written with `python -m engine.checkpoint ...
--draw-at-load` has no files: its tensors are drawn on the model's device instead. Checkpoint names map onto our parameters through the
model's `packed_modules_mapping` (q/k/v -> qkv_proj, gate/up -> gate_up_proj); each
parameter's `weight_loader` copies this rank's tensor-parallel slice.
"""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from engine.layers.linear import copy_weight
from engine.layers.moe import FusedMoE, expert_checkpoint_names, expert_target
from engine.models.config import ModelConfig

# tensors some checkpoints carry that are recomputed, never loaded
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# config fields that must agree between the checkpoint and the built model
SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                "tie_word_embeddings", "qk_norm", "qkv_bias", "o_bias", "quantization", "norm",
                "parallel_residual", "rotary_dim", "num_experts", "moe_intermediate_size",
                "moe_layers")


def _target(name: str, packed: dict) -> tuple[str, object]:
    """Checkpoint tensor name -> (our parameter name, shard id or None). Experts of a
    mixture-of-experts layer go to the stacked w13 / w2 (engine.layers.moe.expert_target)."""
    expert = expert_target(name)
    if expert is not None:
        return expert
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in packed:
            fused, shard_id = packed[part]
            return ".".join(parts[:i] + [fused] + parts[i + 1:]), shard_id
    return name, None


def expected_tensors(model: nn.Module) -> set[str]:
    """The checkpoint tensor names the model needs (a tied LM head is not one)."""
    sources = {}  # fused module -> the checkpoint modules packed into it
    for hf_module, (fused, _) in model.packed_modules_mapping.items():
        sources.setdefault(fused, []).append(hf_module)
    names = set()
    experts = {m: f"{name}." for name, m in model.named_modules() if isinstance(m, FusedMoE)}
    for m, prefix in experts.items():
        names.update(expert_checkpoint_names(prefix, m.num_experts, model.config.architecture))
    for name, _ in model.named_parameters():  # tied weights are listed once
        if any(name.startswith(prefix) for prefix in experts.values()):
            continue
        parts = name.split(".")
        fused = [i for i, part in enumerate(parts) if part in sources]
        if not fused:
            names.add(name)
            continue
        i = fused[0]
        names.update(".".join(parts[:i] + [src] + parts[i + 1:]) for src in sources[parts[i]])
    return names


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Fill `model`'s parameters from the *.safetensors files in `path`.

    Raises ValueError when config.json does not describe the model, a tensor is unknown or
    has the wrong shape, or a tensor the model needs is missing (each error names it).
    """
    path = Path(path)
    cfg = ModelConfig.from_pretrained(path)
    ours = model.config
    differ = [f"{f}: {getattr(cfg, f)} vs {getattr(ours, f)}" for f in SHAPE_FIELDS
              if getattr(cfg, f) != getattr(ours, f)]
    if differ:
        raise ValueError(f"{path}/config.json describes another model than the one built "
                         f"(checkpoint vs model: {'; '.join(differ)})")
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = model.packed_modules_mapping
    needed = expected_tensors(model)
    seen = set()
    for source, name, get_tensor in _checkpoint_tensors(path, model):
        if name.endswith(IGNORED_SUFFIXES):
            continue
        if name == "lm_head.weight" and ours.tie_word_embeddings:
            continue  # some tied checkpoints still store the LM head
        target, shard_id = _target(name, packed)
        param = params.get(target)
        if param is None and _zero_quant_bias(ours, name, get_tensor):
            continue
        if param is None:
            raise ValueError(f"{source}: unexpected tensor {name!r} (no parameter "
                             f"{target!r} in {ours.architecture})")
        loader = getattr(param, "weight_loader", copy_weight)
        args = () if shard_id is None else (shard_id,)
        try:
            with torch.no_grad():
                loader(param, get_tensor(), *args)
        except ValueError as e:
            raise ValueError(f"{source}: tensor {name!r}: {e}") from None
        seen.add(name)
    missing = sorted(needed - seen)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"checkpoint {path} is missing tensor {missing[0]!r}{more}")


def _checkpoint_tensors(path: Path, model: nn.Module):
    """(source, name, get_tensor) for every tensor of the checkpoint, one at a time: read
    from the *.safetensors files, or, for a checkpoint written with engine.checkpoint's
    --draw-at-load (its RECIPE_FILE), drawn on the model's device as the writer would."""
    from engine.checkpoint import RECIPE_FILE, random_tensors
    recipe = path / RECIPE_FILE
    if recipe.is_file():
        spec = json.loads(recipe.read_text())
        hf = json.loads((path / "config.json").read_text())
        device = next(model.parameters()).device
        for name, tensor in random_tensors(hf, spec["seed"], spec["std"], device):
            yield RECIPE_FILE, name, lambda t=tensor: t
        return
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files (nor {RECIPE_FILE}) in {path}")
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield file.name, name, lambda f=f, name=name: f.get_tensor(name)


def _zero_quant_bias(cfg: ModelConfig, name: str, get_tensor) -> bool:
    """AutoGPTQ stores an all-zero bias for quantized layers that have none: skip it."""
    return cfg.quantization is not None and name.endswith(".bias") and not get_tensor().any()
