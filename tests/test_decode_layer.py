"""engine.kernels.decode_layer: a whole decoder layer of a decode-only step as one persistent
launch. Against the engine's torch layer (the unfused reference path: RMSNorm, F.linear, RoPE,
SDPA over the gathered cache) on a decode-only batch of uneven contexts, split several ways by
the runner's work list, with a graph padding row: the same layer output, residual stream and
stored K/V, for Qwen3 (q/k-norm), Qwen2 (qkv bias) and Llama, in fp32 and bf16; the counters
are back at zero after the call.

On the interpreter each stage is its own launch (a grid barrier cannot run there: programs
run one after another); `TRITON_INTERPRET=0 pytest tests/test_decode_layer.py` on a GPU runs
the one-launch kernel with its barriers. The sm_90 compile below checks the barrier's
ordering without a GPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from engine.kernels import decode_layer as dl
from engine.layers.attention import AttentionMetadata
from engine.layers.rotary import RotaryEmbedding
from engine.models.transformer import DecoderLayer
from policy.model import ModelConfig
from tests.test_decode_fold import pa, work_list
from tests.test_kernels import DEVICE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(architecture: str, **kw) -> ModelConfig:
    base = dict(architecture=architecture, vocab_size=64, hidden_size=96, intermediate_size=160,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=2048,
                qk_norm=architecture == "Qwen3ForCausalLM", qkv_bias=architecture == "Qwen2ForCausalLM")
    return ModelConfig(**{**base, **kw})


def random_layer(cfg: ModelConfig, dtype: torch.dtype, seed: int) -> DecoderLayer:
    gen = torch.Generator().manual_seed(seed)
    rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
    layer = DecoderLayer(cfg, rotary, "torch", 0, 1)
    for name, p in layer.named_parameters():
        if name.endswith("norm.weight"):
            p.data = 1 + 0.2 * torch.randn(p.shape, generator=gen)
        else:
            p.data = torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5
    return layer.to(dtype).to(DEVICE)


def decode_step(cfg: ModelConfig, dtype: torch.dtype, contexts, block_size: int, seed: int):
    """A decode-only step: one token per sequence at position context - 1, its slot in the
    sequence's (shuffled) blocks; a last padding row (context 1, slot -1) as a CUDA graph
    pads; random caches; the runner's work list on a small "GPU" so contexts split."""
    gen = torch.Generator().manual_seed(seed)
    kv, d = cfg.num_key_value_heads, cfg.head_dim
    need = [-(-c // block_size) for c in contexts]
    num_blocks = sum(need) + 2
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(contexts) + 1, max(need), dtype=torch.int32)
    slots = []
    for b, (c, n) in enumerate(zip(contexts, need)):
        tables[b, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
        slots.append(int(tables[b, (c - 1) // block_size]) * block_size + (c - 1) % block_size)
    contexts = list(contexts) + [1]          # the padding row reads block 0, stores nothing
    slots.append(-1)
    rows = len(contexts)
    k_cache = torch.randn(num_blocks, block_size, kv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv, d, generator=gen).to(dtype)
    items, index = work_list(contexts[:-1], kv, 3, rows)
    to = lambda t: t.to(DEVICE)                              # noqa: E731
    meta = AttentionMetadata(
        slot_mapping=to(torch.tensor(slots)), block_tables=to(tables),
        context_lens=to(torch.tensor(contexts, dtype=torch.int32)),
        query_start_loc=to(torch.arange(rows + 1, dtype=torch.int32)), max_query_len=1,
        max_context_len=max(contexts), num_decode_tokens=rows, decode_rows=rows,
        decode_work=(to(torch.from_numpy(items)), to(torch.from_numpy(index))))
    positions = to(torch.tensor(contexts, dtype=torch.int64) - 1)
    hidden = to(torch.randn(rows, cfg.hidden_size, generator=gen).to(dtype))
    residual = to(torch.randn(rows, cfg.hidden_size, generator=gen).to(dtype))
    return meta, positions, hidden, residual, to(k_cache), to(v_cache)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen2ForCausalLM", "LlamaForCausalLM"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("first", [False, True])
def test_decode_layer_equals_the_torch_layer(architecture, dtype, first):
    """Output, residual stream and stored K/V as the torch layer computes them (first: the
    first layer, no residual yet: its residual stream is the input)."""
    cfg = tiny_config(architecture)
    layer = random_layer(cfg, dtype, seed=len(architecture))
    meta, positions, hidden, residual, k_cache, v_cache = decode_step(
        cfg, dtype, [40, 1, 700, 1300], block_size=16, seed=3)
    assert int(meta.decode_work[1][:, 1].max()) >= 2        # some sequence split
    residual = None if first else residual
    attn = layer.self_attn.attn
    attn.k_cache, attn.v_cache = k_cache.clone(), v_cache.clone()
    with torch.no_grad():
        ref_out, ref_res = layer(positions, hidden, residual, meta)
    rotary = layer.self_attn.rotary_emb
    out, res = dl.decode_layer(layer.launch_weights(), hidden, residual, positions, rotary.cos, rotary.sin,
                               k_cache, v_cache, meta.block_tables, meta.context_lens,
                               meta.query_start_loc, meta.slot_mapping, meta.decode_work)
    real = slice(0, hidden.shape[0] - 1)                     # not the padding row
    # bf16: the interpreter rounds its bf16 casts toward zero (a norm's output reads ~0.5% low),
    # which compounds over the layer's seven roundings to ~3% from torch's bf16 layer, itself
    # ~0.6% from fp32; compiled on a GPU the kernel rounds to nearest
    tol = 1e-4 if dtype == torch.float32 else (4e-2 if dl._INTERPRETED else 1.5e-2)
    assert rel(res[real], ref_res[real]) < tol
    assert rel(out[real], ref_out[real]) < tol
    assert rel(k_cache, attn.k_cache) < tol and rel(v_cache, attn.v_cache) < tol
    stored = meta.slot_mapping[real].long()
    flat = lambda c: c.view(-1, *c.shape[2:])[stored]       # noqa: E731
    assert rel(flat(k_cache), flat(attn.k_cache)) < tol      # this step's K: normed, rotated
    assert int(pa._TICKETS[k_cache.device].abs().sum()) == 0
    if not dl._INTERPRETED:
        assert int(dl._SYNC[k_cache.device].abs().sum()) == 0


def test_decode_layer_refuses_what_it_cannot_run():
    cfg = tiny_config("LlamaForCausalLM")
    layer = random_layer(cfg, torch.float32, seed=1)
    meta, positions, hidden, residual, k_cache, v_cache = decode_step(cfg, torch.float32, [5, 9], 16, 0)
    rotary = layer.self_attn.rotary_emb
    args = (positions, rotary.cos, rotary.sin, k_cache, v_cache, meta.block_tables, meta.context_lens,
            meta.query_start_loc, meta.slot_mapping, meta.decode_work)
    with pytest.raises(ValueError, match="1..64 rows"):
        dl.decode_layer(layer.launch_weights(), hidden.repeat(30, 1), None, *args)
    with pytest.raises(ValueError, match="activation dtype"):
        dl.decode_layer(layer.launch_weights(), hidden.half(), None, *args)
    with pytest.raises(ValueError, match="ahead"):
        dl.decode_layer(layer.launch_weights(), hidden, None, *args, ahead=5)


def test_split_items_cover_k_in_whole_blocks():
    for n, k, programs in [(4096, 1024, 132), (1024, 2048, 132), (6144, 1024, 132), (1024, 3072, 132),
                           (96, 160, 7), (70, 100, 132)]:
        tiles, splits, k_per_split = dl.split_items(n, k, programs)
        assert tiles * dl.BLOCK_N >= n > (tiles - 1) * dl.BLOCK_N
        assert k_per_split % dl.BLOCK_K == 0 and splits * k_per_split >= k > (splits - 1) * k_per_split
        assert splits == 1 or tiles * splits <= programs     # split only to fill the programs


COMPILE = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from engine.kernels import decode_layer as dl
import inspect
params = list(inspect.signature(dl._decode_layer_kernel.fn).parameters)
ptr = {"x_ptr", "res_ptr", "res1_ptr", "qkv_ptr", "attn_ptr", "o_ptr", "res2_ptr", "gu_ptr", "out_ptr",
       "in_norm_ptr", "post_norm_ptr", "qkv_w", "qkv_b", "o_w", "o_b", "gu_w", "down_w",
       "k_cache_ptr", "v_cache_ptr", "qw_ptr", "kw_ptr"}
i32 = {"arrivals_ptr", "sync_ptr", "block_tables_ptr", "context_lens_ptr", "qsl_ptr", "work_ptr",
       "index_ptr", "tickets_ptr"}
const = dict(HAS_RES=True, QKV_BIAS=False, O_BIAS=False, IEEE=False, SPLIT1=True, SPLIT3=True,
             SPLIT4=False, SPLIT5=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, ELEM_BYTES=2, GROUP=2,
             GROUP_PAD=16, HEAD_DIM=128, HEAD_DIM_PAD=128, BLOCK_SIZE=16, A_BLOCK_N=64,
             TILE_IN_PAGE=False, PRECISION="tf32", UPCAST=False, MERGE_G=2, MERGE_S=16, QK_NORM=True,
             PART_ELEMS=2048, PART_BYTES=4096, PAGES=8, STAGE=0, PREFETCH=True, AHEAD=1)
sig = {}
for p in params:
    if p in const:
        sig[p] = "constexpr"
    elif p in ptr:
        sig[p] = "*bf16"
    elif p in i32:
        sig[p] = "*i32"
    elif p in ("partial_ptr", "apart_ptr", "alse_ptr", "cos_ptr", "sin_ptr"):
        sig[p] = "*fp32"
    elif p in ("pos_ptr", "slot_ptr"):
        sig[p] = "*i64"
    elif p in ("eps", "qk_scale", "qk_eps"):
        sig[p] = "fp32"
    else:
        sig[p] = "i32"
k = triton.compile(ASTSource(fn=dl._decode_layer_kernel, signature=sig, constexprs=const),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
lines = k.asm["ptx"].splitlines()
import re
ops = [re.sub(r"^@%p\d+\s+", "", l.strip()) for l in lines]
atoms = [o for o in ops if o.startswith(("atom.", "red.", "ld.")) and ".global" in o
         and ("atom." in o or ".release" in o or ".acquire" in o)]
print(json.dumps(dict(shared=k.metadata.shared, atoms=atoms,
                      prefetch=sum("prefetch.L2" in l for l in lines),
                      griddep=sum("griddepcontrol" in l for l in lines))))
"""


@pytest.mark.skipif(not os.path.exists(os.path.join(os.path.dirname(__import__("triton").__file__),
                                                    "backends", "nvidia", "bin", "ptxas")),
                    reason="triton's ptxas is not installed")
def test_one_launch_kernel_compiles_for_sm90_with_its_barriers():
    """Compiled for sm_90 (no GPU needed): the barrier arrives with a release reduction and
    polls with acquire loads at GPU scope, the counters are reset by exchanges, L2 prefetches
    are issued, no
    programmatic-dependent-launch wait is compiled in (the kernel must start after the one
    before has completed), and one program fits in an SM's shared memory."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT
    r = json.loads(subprocess.run([sys.executable, "-c", COMPILE], env=env, cwd=ROOT, capture_output=True,
                                  text=True, check=True).stdout.strip().splitlines()[-1])
    atoms = r["atoms"]
    arrivals = [a for a in atoms if ".release" in a and ".add" in a and ".gpu" in a]
    assert len(arrivals) == 4, atoms                                           # 4 barriers
    assert sum(".acquire" in a and ".gpu" in a for a in atoms) >= 4, atoms
    assert sum(".exch" in a for a in atoms) >= 2, atoms
    assert r["prefetch"] > 0 and r["griddep"] == 0
    assert r["shared"] <= 227 * 1024
