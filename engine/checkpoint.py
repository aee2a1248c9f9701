"""Random-weight Hugging Face checkpoints, for tests and benchmarks (no weights can be
downloaded here; the architecture, not the values, sets the speed).

    python -m engine.checkpoint qwen3-0.6b /tmp/qwen3-0.6b [--dtype bfloat16] [--seed 0]

writes config.json (from conf/model/<name>.yaml, the single source of truth for model
shapes), generation_config.json and safetensors shards with Hugging Face tensor names
(+ model.safetensors.index.json when there is more than one shard). Tensors are generated
one at a time (on the GPU when there is one) and written shard by shard, so at most one
shard is held in host memory.
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


def _plan_shards(shapes: dict, itemsize: int, max_shard_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, shape in shapes.items():
        nbytes = itemsize * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_random_checkpoint(config: dict | str, path: str | Path, dtype: str = "bfloat16",
                            seed: int = 0, max_shard_bytes: int = 4 << 30, std: float = 0.02,
                            device: str | None = None, progress: bool = True) -> Path:
    """Write a random-weight checkpoint of `config` (an HF config dict, or a model name from
    conf/model/) to directory `path`; returns the path. `progress`: a bar over the bytes
    written (an 8B model is 16 GB: minutes).

    Weights and biases ~ N(0, std); norm weights ~ 1 + N(0, std). The values depend on
    `seed` and on the device that draws them (cuda when available, else cpu)."""
    hf = dict(model_config_dict(config) if isinstance(config, str) else config)
    torch_dtype = resolve_dtype(dtype)
    hf["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
    hf.pop("dtype", None)
    cfg = ModelConfig.from_hf(hf)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = {k: hf[k] for k in ("bos_token_id", "eos_token_id") if hf.get(k) is not None}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    shapes = hf_tensor_shapes(cfg)
    shards = _plan_shards(shapes, torch_dtype.itemsize, max_shard_bytes)
    gen = torch.Generator(device).manual_seed(seed)
    weight_map, total = {}, 0
    size = sum(torch.Size(shape).numel() for shape in shapes.values()) * torch_dtype.itemsize
    bar = tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
               desc=f"random weights -> {path.name}", leave=False)
    for i, names in enumerate(shards):
        file = ("model.safetensors" if len(shards) == 1
                else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        tensors = {}
        for name in names:
            t = torch.randn(shapes[name], generator=gen, device=device, dtype=torch.float32) * std
            if "norm" in name and name.endswith("weight"):
                t += 1.0
            tensors[name] = t.to(torch_dtype).cpu()
            total += tensors[name].nbytes
            weight_map[name] = file
            bar.update(tensors[name].nbytes)
        save_file(tensors, path / file, metadata={"format": "pt"})
        del tensors
    bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="name in conf/model/ (e.g. qwen3-0.6b), a .yaml with "
                        f"hf_config, a config.json, or tiny-<arch> ({', '.join(TINY)})")
    parser.add_argument("path", help="output directory")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--std", type=float, default=0.02)
    parser.add_argument("--device", default=None, help="where weights are drawn (default: "
                        "cuda if available)")
    parser.add_argument("--max-shard-gb", type=float, default=4.0)
    args = parser.parse_args(argv)
    config = (tiny_config(args.model.removeprefix("tiny-")) if args.model.startswith("tiny-")
              else args.model)
    start = time.perf_counter()
    out = write_random_checkpoint(config, args.path, args.dtype, args.seed,
                                  int(args.max_shard_gb * 2**30), args.std, args.device)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
