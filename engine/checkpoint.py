"""Random-weight Hugging Face checkpoints, for tests and benchmarks (no weights can be
downloaded here; the architecture, not the values, sets the speed).

    python -m engine.checkpoint qwen3-0.6b /tmp/qwen3-0.6b [--dtype bfloat16] [--seed 0]
    python -m engine.checkpoint llama-3.1-8b /tmp/l8-gptq --quantization gptq \
        [--group-size 128|-1] [--desc-act] [--asym] [--checkpoint-format gptq|gptq_v2]
    python -m engine.checkpoint llama-3.1-8b /tmp/l8-awq --quantization awq [--group-size 128]
    python -m engine.checkpoint qwen3-30b-a3b /tmp/q30 --draw-at-load   # no weight files

writes config.json (from conf/model/<name>.yaml, the single source of truth for model
shapes), generation_config.json and safetensors shards with Hugging Face tensor names
(+ model.safetensors.index.json when there is more than one shard). Tensors are generated
one at a time (on the GPU when there is one) and written shard by shard, so at most one
shard is held in host memory. With --draw-at-load no weights are written: engine.loader
draws the same tensors on the model's device when it loads (RECIPE_FILE).

With --quantization the decoder layers' linear weights are drawn as above, then round-to-
nearest quantized to 4 bits and packed into the published layouts (engine.layers.quant
documents them; the packing here is written from the formats' description, and a test
reads it back with the reference unpacking there): GPTQ as AutoGPTQ writes it (qweight
packed along the input, qzeros along the output with the stored zero - 1 of checkpoint_format
"gptq", act-order as a random permutation of each input's rows into groups, shared by the
layers reading the same input), AWQ as AutoAWQ's GEMM version writes it (the interleaved
column order). config.json gets the `quantization_config` those tools write.
"""
import argparse
import json
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from tqdm import tqdm

from engine.models import ModelConfig, resolve_dtype
from policy.quantization import PACK, QuantConfig

MODEL_CONF_DIR = Path(__file__).resolve().parent.parent / "conf" / "model"

TINY_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=512,
                 max_position_embeddings=512, rms_norm_eps=1e-6, hidden_act="silu",
                 bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                 torch_dtype="float32")
TINY = {
    # Qwen3: q/k-norm, head_dim set explicitly (4 x 32 != hidden 64, as in the real models)
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32,
                  attention_bias=False, rope_theta=1000000.0, tie_word_embeddings=True,
                  use_sliding_window=False, sliding_window=None),
    # Qwen2: q/k/v biases
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", rope_theta=1000000.0,
                  use_sliding_window=False, sliding_window=None),
    # Llama 3.1 RoPE scaling, with a short original context so that all three frequency
    # bands (kept, interpolated, stretched) occur at head_dim 16
    "llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False,
                  mlp_bias=False, rope_theta=500000.0,
                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                    high_freq_factor=4.0, original_max_position_embeddings=64)),
    "mistral": dict(architectures=["MistralForCausalLM"], model_type="mistral",
                    rope_theta=1000000.0, sliding_window=None),
    # GPT-NeoX (Pythia): parallel residual, RoPE on a quarter of each head, biases everywhere
    "gpt_neox": dict(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox",
                     num_key_value_heads=None, head_dim=None, hidden_act="gelu",
                     layer_norm_eps=1e-5, rotary_pct=0.25, rotary_emb_base=10000,
                     use_parallel_residual=True, attention_bias=True, bos_token_id=0),
    # Qwen3-MoE: 8 experts, top-2 renormalized; layer 0 dense (mlp_only_layers) so both MLP
    # kinds occur
    "qwen3_moe": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                      head_dim=32, attention_bias=False, rope_theta=1000000.0,
                      use_sliding_window=False, sliding_window=None, num_experts=8,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[0]),
    # Mixtral: 4 experts of width intermediate_size, top-2
    "mixtral": dict(architectures=["MixtralForCausalLM"], model_type="mixtral",
                    rope_theta=1000000.0, sliding_window=None, num_local_experts=4,
                    num_experts_per_tok=2, intermediate_size=32),
}


def tiny_config(arch: str, **overrides) -> dict:
    """A small Hugging Face config dict for `arch` (a key of TINY):
    hidden 64, 2 layers, 4 heads, 2 KV heads, vocab 512, float32. `overrides` replace keys."""
    if arch not in TINY:
        raise ValueError(f"no tiny config for {arch!r}; choose one of {list(TINY)}")
    return {**TINY_BASE, **TINY[arch], **overrides}


def model_config_dict(name_or_file: str) -> dict:
    """The hf_config of conf/model/<name>.yaml, or of a given .yaml / config.json file."""
    file = Path(name_or_file)
    if file.suffix == ".json":
        return json.loads(file.read_text())
    if file.suffix not in (".yaml", ".yml"):
        file = MODEL_CONF_DIR / f"{name_or_file}.yaml"
    if not file.is_file():
        known = sorted(p.stem for p in MODEL_CONF_DIR.glob("*.yaml"))
        raise ValueError(f"unknown model {name_or_file!r}: no {file}; known: {known}")
    data = yaml.safe_load(file.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("hf_config"), dict):
        raise ValueError(f"{file} must hold a mapping with an 'hf_config' mapping")
    return data["hf_config"]


def _neox_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """GPT-NeoX: fused query_key_value (rows per head: q, k, v), LayerNorms with bias, GELU
    MLP with biases, untied embed_out."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    shapes = {"gpt_neox.embed_in.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"gpt_neox.layers.{i}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{p}.{norm}.weight"] = shapes[f"{p}.{norm}.bias"] = (h,)
        shapes[f"{p}.attention.query_key_value.weight"] = (3 * cfg.q_size, h)
        shapes[f"{p}.attention.query_key_value.bias"] = (3 * cfg.q_size,)
        shapes[f"{p}.attention.dense.weight"] = (h, cfg.q_size)
        shapes[f"{p}.attention.dense.bias"] = (h,)
        shapes[f"{p}.mlp.dense_h_to_4h.weight"] = (inter, h)
        shapes[f"{p}.mlp.dense_h_to_4h.bias"] = (inter,)
        shapes[f"{p}.mlp.dense_4h_to_h.weight"] = (h, inter)
        shapes[f"{p}.mlp.dense_4h_to_h.bias"] = (h,)
    shapes["gpt_neox.final_layer_norm.weight"] = shapes["gpt_neox.final_layer_norm.bias"] = (h,)
    shapes["embed_out.weight"] = (cfg.vocab_size, h)
    return shapes


def _moe_mlp_shapes(cfg: ModelConfig, p: str) -> dict[str, tuple[int, ...]]:
    """One layer's router and experts, named as the published checkpoints name them."""
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    if cfg.architecture == "MixtralForCausalLM":
        shapes = {f"{p}.block_sparse_moe.gate.weight": (cfg.num_experts, h)}
        for e in range(cfg.num_experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            shapes.update({f"{q}.w1.weight": (inter, h), f"{q}.w2.weight": (h, inter),
                           f"{q}.w3.weight": (inter, h)})
        return shapes
    shapes = {f"{p}.mlp.gate.weight": (cfg.num_experts, h)}
    for e in range(cfg.num_experts):
        q = f"{p}.mlp.experts.{e}"
        shapes.update({f"{q}.gate_proj.weight": (inter, h), f"{q}.up_proj.weight": (inter, h),
                       f"{q}.down_proj.weight": (h, inter)})
    return shapes


def hf_tensor_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> shape, in checkpoint order."""
    if cfg.architecture == "GPTNeoXForCausalLM":
        return _neox_tensor_shapes(cfg)
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.input_layernorm.weight"] = (h,)
        for proj, out in (("q_proj", cfg.q_size), ("k_proj", cfg.kv_size), ("v_proj", cfg.kv_size)):
            shapes[f"{p}.self_attn.{proj}.weight"] = (out, h)
            if cfg.qkv_bias:
                shapes[f"{p}.self_attn.{proj}.bias"] = (out,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (h, cfg.q_size)
        if cfg.o_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (h,)
        if cfg.qk_norm:
            shapes[f"{p}.self_attn.q_norm.weight"] = (d,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (d,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (h,)
        if i in cfg.moe_layers:
            shapes.update(_moe_mlp_shapes(cfg, p))
            continue
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, h)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, h)
        shapes[f"{p}.mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


RECIPE_FILE = "random_weights.json"   # a checkpoint drawn at load time (no safetensors files)


def random_tensors(hf: dict, seed: int = 0, std: float = 0.02,
                   device: str | torch.device | None = None):
    """The tensors of a random checkpoint of Hugging Face config `hf` (its torch_dtype, its
    quantization_config if any), one at a time in checkpoint order: yields (name, tensor on
    `device`). Weights and biases ~ N(0, std); norm weights ~ 1 + N(0, std); quantized
    layers round-to-nearest 4-bit in their published layout. The values depend on `seed`
    and on the device type that draws them (cuda when available, else cpu); at most one
    full tensor is held at a time."""
    cfg = ModelConfig.from_hf(hf)
    quant, torch_dtype = cfg.quantization, resolve_dtype(hf["torch_dtype"])
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    shapes = hf_tensor_shapes(cfg)
    gen = torch.Generator(device).manual_seed(seed)
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * std
        if "norm" in name and name.endswith("weight"):
            t += 1.0
        if not _quantized(name, quant):
            yield name, t.to(torch_dtype)
            continue
        yield from quantized_tensors(name, t.to(torch_dtype).float(), quant,
                                     _act_order(name, shape[1], quant, seed)).items()


def write_random_checkpoint(config: dict | str, path: str | Path, dtype: str = "bfloat16",
                            seed: int = 0, max_shard_bytes: int = 4 << 30, std: float = 0.02,
                            device: str | None = None, progress: bool = True,
                            quantization: dict | None = None, files: bool = True) -> Path:
    """Write a random-weight checkpoint of `config` (an HF config dict, or a model name from
    conf/model/) to directory `path`; returns the path. `progress`: a bar over the bytes
    written (an 8B model is 16 GB: minutes). `quantization`: a `quantization_config` (see
    quantization_config()) to quantize the decoder's linear layers into. Values:
    `random_tensors`.

    `files=False` writes no safetensors: config.json and a recipe (RECIPE_FILE: seed, std)
    from which engine.loader draws the same tensors on the model's device at load time, so
    a model larger than the disk (Qwen3-30B-A3B: 61 GB) still loads through the loader's
    name mapping and weight loaders; only the file reads are skipped."""
    hf = dict(model_config_dict(config) if isinstance(config, str) else config)
    torch_dtype = resolve_dtype(dtype)
    hf["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    hf.pop("dtype", None)
    if quantization is not None:
        hf["quantization_config"] = dict(quantization)
    cfg = ModelConfig.from_hf(hf)
    quant = cfg.quantization
    if quant is not None:
        for in_features, _ in cfg.linear_shapes:
            if quant.group_size != -1 and in_features % quant.group_size:
                raise ValueError(f"quantization_config.group_size={quant.group_size} does not "
                                 f"divide the in_features {in_features} of a linear layer")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for old in [*path.glob("*.safetensors"), path / "model.safetensors.index.json", path / RECIPE_FILE]:
        old.unlink(missing_ok=True)     # a rewrite leaves no stale weights behind
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if hf.get(k) is not None}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if not files:
        (path / RECIPE_FILE).write_text(json.dumps({"seed": seed, "std": std}, indent=2) + "\n")
        return path

    shapes = hf_tensor_shapes(cfg)
    sizes = {name: (quant.weight_bytes(shape[1], shape[0]) if _quantized(name, quant)
                    else torch.Size(shape).numel() * torch_dtype.itemsize)
             for name, shape in shapes.items()}
    shards = _plan_shards(sizes, max_shard_bytes)
    shard_of = {name: i for i, names in enumerate(shards) for name in names}
    weight_map, total, shard, tensors = {}, 0, 0, {}
    bar = tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024,
               disable=not progress, desc=f"random weights -> {path.name}", leave=False)

    def file_name(i: int) -> str:
        return ("model.safetensors" if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")

    def flush() -> None:      # one shard on the host at a time
        save_file(tensors, path / file_name(shard), metadata={"format": "pt"})
        tensors.clear()
    for key, tensor in random_tensors(hf, seed, std, device):
        i = shard_of[key if key in shard_of else key.rsplit(".", 1)[0] + ".weight"]
        if i != shard:
            flush()
            shard = i
        tensors[key] = tensor.cpu().contiguous()
        total += tensor.nbytes
        weight_map[key] = file_name(i)
        bar.update(tensor.nbytes)
    flush()
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


# ---- 4-bit quantization (round to nearest) into the GPTQ / AWQ layouts -------------------
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)   # AutoAWQ GEMM: bits 4k..4k+3 hold column order[k]
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# layers reading the same input share GPTQ's act-order (one Hessian, one permutation)
SAME_INPUT = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2,
              "up_proj": 2, "down_proj": 3}


def quantization_config(method: str, group_size: int = 128, desc_act: bool = False,
                        sym: bool = True, checkpoint_format: str = "gptq") -> dict:
    """config.json's `quantization_config` as AutoGPTQ (method "gptq") or AutoAWQ ("awq",
    GEMM version) writes it."""
    if method == "gptq":
        return {"bits": 4, "group_size": group_size, "damp_percent": 0.01,
                "desc_act": desc_act, "static_groups": False, "sym": sym,
                "true_sequential": True, "model_name_or_path": None,
                "model_file_base_name": "model", "quant_method": "gptq",
                "checkpoint_format": checkpoint_format}
    if method == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": None}
    raise ValueError(f"--quantization must be gptq or awq, got {method!r}")


def _quantized(name: str, quant: QuantConfig | None) -> bool:
    parts = name.split(".")
    return (quant is not None and name.startswith("model.layers.") and parts[-1] == "weight"
            and parts[-2] in QUANTIZED)


def _act_order(name: str, in_features: int, quant: QuantConfig, seed: int):
    """GPTQ act-order: the order in which the input rows were quantized (None: natural)."""
    if not quant.desc_act:
        return None
    layer, proj = int(name.split(".")[2]), name.split(".")[-2]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + layer * 4 + SAME_INPUT[proj])
    return torch.randperm(in_features, generator=gen)


def quantize_rtn(w: torch.Tensor, quant: QuantConfig, perm: torch.Tensor | None = None) -> dict:
    """Round-to-nearest 4-bit quantization of W [O, I] in groups of input rows (taken in the
    order `perm`, GPTQ act-order, when given). Returns {"q": [I, O], "zeros": [G, O] (int64,
    the true zero point), "scales": [G, O] fp16, "g_idx": [I] int32, "weight": the
    dequantized W [O, I] float32}."""
    out_features, in_features = w.shape
    gs = in_features if quant.group_size == -1 else quant.group_size
    if in_features % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {in_features}")
    groups, maxq = in_features // gs, 2 ** quant.bits - 1
    dev = w.device
    order = torch.arange(in_features, device=dev) if perm is None else perm.to(dev)
    g_idx = torch.empty(in_features, dtype=torch.int32, device=dev)
    g_idx[order] = torch.arange(in_features, dtype=torch.int32, device=dev) // gs
    grouped = w.t()[order].reshape(groups, gs, out_features).float()
    lo, hi = grouped.amin(1), grouped.amax(1)
    if quant.sym:   # AutoGPTQ: symmetric range around the zero point 2^(bits-1)
        scales = (torch.maximum(lo.abs(), hi) * 2 / maxq).half()
        zeros = torch.full_like(lo, (maxq + 1) // 2, dtype=torch.int64)
    else:
        scales = ((hi - lo) / maxq).half()
    scales = torch.where(scales > 0, scales, torch.ones_like(scales) * 1e-4)
    if not quant.sym:   # "gptq" stores zero - 1: a zero of 0 has no encoding there
        zeros = (-lo / scales.float()).round().clamp(quant.zero_offset, maxq).long()
    values = (grouped / scales.float()[:, None]).round() + zeros[:, None]
    values = values.clamp(0, maxq).long().reshape(in_features, out_features)
    q = torch.empty_like(values)
    q[order] = values
    g = g_idx.long()
    weight = ((q - zeros[g]).float() * scales.float()[g]).t()
    return {"q": q, "zeros": zeros, "scales": scales, "g_idx": g_idx, "weight": weight}


def _int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit words (int64) -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_rows(values: torch.Tensor) -> torch.Tensor:
    """[R, C] 4-bit values -> [R/8, C] int32: word [i, c] holds rows 8i..8i+7, row 8i+k in
    bits 4k..4k+3."""
    v = values.long().reshape(-1, PACK, values.shape[1])
    return _int32(sum(v[:, k] << (4 * k) for k in range(PACK)))


def pack_cols(values: torch.Tensor, order=tuple(range(PACK))) -> torch.Tensor:
    """[R, C] 4-bit values -> [R, C/8] int32: bits 4k..4k+3 of word [r, j] hold column
    8j + order[k]."""
    v = values.long().reshape(values.shape[0], -1, PACK)
    return _int32(sum(v[:, :, order[k]] << (4 * k) for k in range(PACK)))


def quantized_tensors(name: str, w: torch.Tensor, quant: QuantConfig,
                      perm: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (on the CPU) of linear weight `name` ("....q_proj.weight", W [O, I],
    quantized on its device) in the layout of `quant`."""
    rtn = quantize_rtn(w, quant, perm)
    prefix = name.removesuffix(".weight")
    if quant.method == "gptq":
        tensors = {f"{prefix}.qweight": pack_rows(rtn["q"]),
                   f"{prefix}.qzeros": pack_cols((rtn["zeros"] - quant.zero_offset)),
                   f"{prefix}.scales": rtn["scales"],
                   f"{prefix}.g_idx": rtn["g_idx"]}
    else:
        tensors = {f"{prefix}.qweight": pack_cols(rtn["q"], AWQ_PACK_ORDER),
                   f"{prefix}.qzeros": pack_cols(rtn["zeros"], AWQ_PACK_ORDER),
                   f"{prefix}.scales": rtn["scales"]}
    return {k: v.cpu().contiguous() for k, v in tensors.items()}


def write_dequantized_checkpoint(src: str | Path, dst: str | Path,
                                 dtype: str = "float32") -> Path:
    """Copy quantized checkpoint `src` to `dst` with every quantized linear layer replaced by
    its dequantized `weight` (engine.layers.quant's reference) in `dtype`, and no
    quantization_config: the dense model a quantized one must match."""
    from safetensors import safe_open
    from engine.layers.quant import dequantize_awq, dequantize_gptq
    src, dst = Path(src), Path(dst)
    hf = json.loads((src / "config.json").read_text())
    quant = QuantConfig.from_hf(hf.pop("quantization_config"))
    torch_dtype = resolve_dtype(dtype)
    hf["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for extra in ("generation_config.json",):
        if (src / extra).is_file():
            (dst / extra).write_text((src / extra).read_text())
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="pt", device="cpu") as f:
            names = list(f.keys())
            tensors = {n: f.get_tensor(n).to(torch_dtype) for n in names
                       if n.rsplit(".", 1)[-1] not in ("qweight", "qzeros", "scales", "g_idx")}
            for n in names:
                if not n.endswith(".qweight"):
                    continue
                prefix = n.removesuffix(".qweight")
                q, z, s = (f.get_tensor(f"{prefix}.{t}") for t in ("qweight", "qzeros", "scales"))
                w = (dequantize_gptq(q, z, s, f.get_tensor(f"{prefix}.g_idx"), quant.zero_offset)
                     if quant.method == "gptq" else dequantize_awq(q, z, s, quant.group_size))
                tensors[f"{prefix}.weight"] = w.to(torch_dtype).contiguous()
        save_file(tensors, dst / file.name, metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.is_file():   # the dense tensors live in the same files as their packed forms
        data = json.loads(index.read_text())
        weight_map = {}
        for name, file in data["weight_map"].items():
            kind = name.rsplit(".", 1)
            if kind[-1] == "qweight":
                weight_map[f"{kind[0]}.weight"] = file
            elif kind[-1] not in ("qzeros", "scales", "g_idx"):
                weight_map[name] = file
        (dst / index.name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                 indent=2) + "\n")
    return dst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="name in conf/model/ (e.g. qwen3-0.6b, tiny-qwen3-moe), a "
                        f".yaml with hf_config, a config.json, or tiny-<arch> ({', '.join(TINY)})")
    parser.add_argument("path", help="output directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02)
    parser.add_argument("--device", default=None, help="where weights are drawn (default: "
                        "cuda if available)")
    parser.add_argument("--max-shard-gb", type=float, default=4.0)
    parser.add_argument("--quantization", choices=("gptq", "awq"), default=None,
                        help="4-bit linear layers in this published layout")
    parser.add_argument("--group-size", type=int, default=128, help="-1: one group")
    parser.add_argument("--desc-act", action="store_true", help="GPTQ act-order")
    parser.add_argument("--asym", action="store_true", help="GPTQ with zero points (sym=false)")
    parser.add_argument("--checkpoint-format", default="gptq", choices=("gptq", "gptq_v2"))
    parser.add_argument("--draw-at-load", action="store_true",
                        help=f"write no weight files: config.json and {RECIPE_FILE}, from which "
                        "the loader draws the same random tensors on the device (for models "
                        "larger than the disk or to skip minutes of writing and reading)")
    args = parser.parse_args(argv)
    tiny = args.model.startswith("tiny-") and not (MODEL_CONF_DIR / f"{args.model}.yaml").is_file()
    config = tiny_config(args.model.removeprefix("tiny-")) if tiny else args.model
    if args.quantization == "awq" and (args.desc_act or args.asym):
        parser.error("--desc-act and --asym are GPTQ options (AWQ is always asymmetric)")
    quantization = None if args.quantization is None else quantization_config(
        args.quantization, args.group_size, args.desc_act, not args.asym, args.checkpoint_format)
    start = time.perf_counter()
    try:
        out = write_random_checkpoint(config, args.path, args.dtype, args.seed,
                                      int(args.max_shard_gb * 2**30), args.std, args.device,
                                      quantization=quantization, files=not args.draw_at_load)
    except ValueError as e:
        parser.error(str(e))
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    what = f"{size / 2**30:.2f} GiB" if not args.draw_at_load else "weights drawn at load time"
    print(f"wrote {out} ({what}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
