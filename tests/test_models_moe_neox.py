"""GPT-NeoX, Qwen3-MoE and Mixtral against Hugging Face transformers on the CPU (fp32): the
model's logits over a paged varlen batch, and the engine's greedy generation token for token
(with chunked prefill, preemption, prefix-cache hits, TP=2 over gloo); the MoE layer against
a dense reference; the configs' parameter counts against transformers and the model cards."""
import dataclasses
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import yaml

from engine import LLM, SamplingParams
from engine.checkpoint import MODEL_CONF_DIR, hf_tensor_shapes, tiny_config, write_random_checkpoint
from engine.layers.moe import FusedMoE, moe_reference, route
from engine.models import ModelConfig, build_model
from test_engine import PREFIX_PROMPTS, PROMPTS, SHARED, hf_greedy, total
from test_models import PagedKV, hf_model, our_model, prompts
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

ARCHS = ["gpt_neox", "qwen3_moe", "mixtral"]
MAX_TOKENS = 16
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
CPU = dict(device="cpu", dtype="float32", attention_backend="torch")
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {arch: str(write_random_checkpoint(tiny_config(arch), root / arch, dtype="float32",
                                              seed=0, std=0.3, progress=False))
            for arch in ARCHS}


@pytest.fixture(scope="module")
def reference(checkpoints):
    refs = {arch: hf_greedy(path, PROMPTS + PREFIX_PROMPTS) for arch, path in checkpoints.items()}
    for outs in refs.values():   # the comparison means something only if outputs vary
        assert len({t for out in outs for t in out}) > 20
        assert len({tuple(out) for out in outs}) == len(outs)
    return refs


def generate(path, prompts, **kwargs):
    llm = LLM(path, **{**CPU, "num_gpu_blocks": 256, "max_model_len": 128, **kwargs})
    return llm, llm.generate(prompts, GREEDY, use_tqdm=False)


# ---- the model: logits over a paged varlen batch -----------------------------------------

@pytest.mark.parametrize("arch,overrides", [
    ("gpt_neox", {}), ("gpt_neox", dict(use_parallel_residual=False, rotary_pct=0.5)),
    ("qwen3_moe", {}), ("qwen3_moe", dict(norm_topk_prob=False, mlp_only_layers=[])),
    ("mixtral", {})], ids=["neox", "neox-sequential", "qwen3_moe", "qwen3_moe-raw-topk",
                           "mixtral"])
def test_logits_match_hf_chunked(arch, overrides, tmp_path):
    """One-shot prompts, then the same prompts in two chunks (decode-shaped last tokens
    mixed with a prefill chunk): both give transformers' logits."""
    write_random_checkpoint(tiny_config(arch, **overrides), tmp_path, dtype="float32", seed=1,
                            std=0.1, progress=False)
    hf = hf_model(tmp_path)
    model = our_model(tmp_path)
    a, b, c = prompts(model.config.vocab_size)
    with torch.no_grad():
        ref = [hf(torch.tensor([p])).logits[0] for p in (a, b, c)]
    one = PagedKV(model).step([(i, p, 0, len(p)) for i, p in enumerate((a, b, c))])
    kv = PagedKV(model, seed=1)
    first = kv.step([("a", a, 0, len(a) - 1), ("b", b, 0, 6), ("c", c, 0, len(c) - 1)])
    second = kv.step([("a", a, len(a) - 1, 1), ("c", c, len(c) - 1, 1), ("b", b, 6, len(b) - 6)])
    second = [second[0], second[2], second[1]]
    for name, r, o, f, s in zip("abc", ref, one, first, second):
        torch.testing.assert_close(o, r, **TOL, msg=f"{arch} prompt {name}")
        torch.testing.assert_close(torch.cat([f, s]), r, **TOL, msg=f"{arch} chunked {name}")


def test_neox_qkv_layout_matters(tmp_path):
    """Negative control: reading query_key_value as [q; k; v] blocks (not per head) changes
    the logits."""
    write_random_checkpoint(tiny_config("gpt_neox"), tmp_path, dtype="float32", std=0.1,
                            progress=False)
    p = prompts(512, lens=(12,))[0]
    ref = hf_model(tmp_path)(torch.tensor([p])).logits[0].detach()
    model = our_model(tmp_path)
    for layer in model.gpt_neox.layers:
        qkv = layer.attention.query_key_value
        with torch.no_grad():   # undo the per-head reorder: rows as stored in the checkpoint
            w = qkv.weight.view(3, qkv.num_heads, qkv.head_dim, -1).transpose(0, 1)
            qkv.weight.copy_(w.reshape(qkv.weight.shape))
    out = PagedKV(model).step([(0, p, 0, len(p))])[0]
    assert not torch.allclose(out, ref, **TOL)


# ---- the engine: greedy generation equals transformers -----------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_hf(checkpoints, reference, arch):
    _, outs = generate(checkpoints[arch], PROMPTS)
    assert [o.token_ids for o in outs] == reference[arch][:len(PROMPTS)]


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_and_preemption(checkpoints, reference, arch):
    llm, outs = generate(checkpoints[arch], PROMPTS, num_gpu_blocks=16, block_size=4,
                         max_model_len=64, max_num_batched_tokens=16, max_num_seqs=4)
    assert any(r["num_sampled"] < r["num_seqs"] for r in llm.step_records), "no prefill chunk"
    assert total(llm, "num_preempted") > 0
    assert [o.token_ids for o in outs] == reference[arch][:len(PROMPTS)]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_hits(checkpoints, reference, arch):
    llm = LLM(checkpoints[arch], **CPU, num_gpu_blocks=256, max_model_len=128, block_size=4)
    first = llm.generate(PREFIX_PROMPTS[:1], GREEDY, use_tqdm=False)
    rest = llm.generate(PREFIX_PROMPTS[1:], GREEDY, use_tqdm=False)
    assert total(llm, "prefix_hit_tokens") >= len(SHARED) // 4 * 4
    assert [o.token_ids for o in first + rest] == reference[arch][len(PROMPTS):]


@pytest.mark.distributed
@pytest.mark.parametrize("arch", ARCHS)
def test_tensor_parallel_gloo(checkpoints, reference, arch):
    """TP=2: each rank holds half the heads and half of every expert's intermediate dim."""
    with LLM(checkpoints[arch], **CPU, num_gpu_blocks=256, max_model_len=128,
             tensor_parallel_size=2) as llm:
        outs = llm.generate(PROMPTS[:3], GREEDY, use_tqdm=False)
    assert [o.token_ids for o in outs] == reference[arch][:3]


# ---- the MoE layer -------------------------------------------------------------------------

def dense_moe(x, w13, w2, weights, ids):
    """Every expert on every token, masked by a [T, E] routing matrix: the definition."""
    gate_w = torch.zeros(x.shape[0], w13.shape[0]).scatter_(1, ids, weights)
    out = torch.zeros_like(x)
    for e in range(w13.shape[0]):
        gate, up = (x @ w13[e].T).chunk(2, dim=-1)
        out += gate_w[:, e:e + 1] * ((torch.nn.functional.silu(gate) * up) @ w2[e].T)
    return out


@pytest.mark.parametrize("num_tokens,num_experts,top_k", [(1, 8, 2), (37, 16, 4), (5, 4, 4)])
def test_moe_reference_matches_dense(num_tokens, num_experts, top_k):
    g = torch.Generator().manual_seed(num_tokens)
    x = torch.randn(num_tokens, 24, generator=g)
    w13 = torch.randn(num_experts, 2 * 20, 24, generator=g) / 5
    w2 = torch.randn(num_experts, 24, 20, generator=g) / 5
    weights, ids = route(torch.randn(num_tokens, num_experts, generator=g), top_k, True)
    torch.testing.assert_close(moe_reference(x, w13, w2, weights, ids),
                               dense_moe(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


def test_routing_rules():
    logits = torch.randn(9, 8, generator=torch.Generator().manual_seed(0))
    w, ids = route(logits, 2, renormalize=True)
    # renormalized top-k of the softmax == softmax over the top-k logits (Mixtral's rule)
    torch.testing.assert_close(w, torch.softmax(logits.gather(1, ids), -1))
    raw, raw_ids = route(logits, 2, renormalize=False)
    assert torch.equal(ids, raw_ids) and (raw.sum(-1) < 1).all()
    torch.testing.assert_close(raw, torch.softmax(logits, -1).gather(1, ids))


def test_expert_tensor_parallel_slices():
    """Rank r of 2 holds rows/cols [r*I/2, (r+1)*I/2) of each expert's gate, up and down."""
    full = [torch.randn(8, 6), torch.randn(8, 6), torch.randn(6, 8)]   # gate, up, down
    for rank in range(2):
        moe = FusedMoE(6, 8, 3, 1, True, rank, 2)
        for which, t in enumerate(full):
            moe.weight_loader(moe.w2 if which == 2 else moe.w13, t, (1, which))
        half = slice(4 * rank, 4 * rank + 4)
        assert torch.equal(moe.w13[1, :4], full[0][half])
        assert torch.equal(moe.w13[1, 4:], full[1][half])
        assert torch.equal(moe.w2[1], full[2][:, half])
    with pytest.raises(ValueError, match="expert 3"):
        moe.weight_loader(moe.w13, full[0], (3, 0))


# ---- configs, checkpoints, errors ----------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_param_counts_match_transformers(checkpoints, arch):
    cfg = ModelConfig.from_pretrained(checkpoints[arch])
    hf = hf_model(checkpoints[arch])
    assert cfg.num_params == sum(p.numel() for p in hf.parameters())
    assert cfg.num_params == sum(torch.Size(s).numel() for s in hf_tensor_shapes(cfg).values())
    if cfg.is_moe:
        per_expert = cfg.expert_params
        idle = (cfg.num_experts - cfg.num_experts_per_tok) * len(cfg.moe_layers)
        assert cfg.num_active_params == cfg.num_params - idle * per_expert < cfg.num_params


def test_moe_layers_follow_config():
    def layers(**kw):
        return ModelConfig.from_hf(tiny_config("qwen3_moe", num_hidden_layers=6, **kw)).moe_layers
    assert layers(mlp_only_layers=[]) == (0, 1, 2, 3, 4, 5)
    assert layers(mlp_only_layers=[0, 4]) == (1, 2, 3, 5)
    assert layers(mlp_only_layers=[], decoder_sparse_step=2) == (1, 3, 5)
    assert ModelConfig.from_hf(tiny_config("mixtral")).moe_layers == (0, 1)


def conf_model(name):
    data = yaml.safe_load((MODEL_CONF_DIR / f"{name}.yaml").read_text())
    return ModelConfig.from_hf(data["hf_config"])


def test_conf_models_have_the_published_sizes():
    """Model cards: Qwen3-30B-A3B 30.5B total / 3.3B active, Mixtral-8x7B 46.7B / 12.9B,
    Pythia-1.4B 1,414,647,808 parameters."""
    def billions(n, digits=1):
        return round(n / 1e9, digits)
    qwen, mixtral, pythia = (conf_model(n) for n in ("qwen3-30b-a3b", "mixtral-8x7b",
                                                      "pythia-1.4b"))
    assert (billions(qwen.num_params), billions(qwen.num_active_params)) == (30.5, 3.4)
    assert (billions(mixtral.num_params), billions(mixtral.num_active_params)) == (46.7, 12.9)
    assert pythia.num_params == 1_414_647_808 and pythia.rope_dim == 32
    for cfg in (qwen, mixtral, pythia):
        assert cfg.num_params == sum(torch.Size(s).numel()
                                     for s in hf_tensor_shapes(cfg).values())


def test_loader_names_missing_expert(tmp_path):
    write_random_checkpoint(tiny_config("mixtral"), tmp_path, dtype="float32", progress=False)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    model = build_model(ModelConfig.from_pretrained(tmp_path), torch.float32, "cpu")
    from engine.loader import load_weights
    with pytest.raises(ValueError, match=r"block_sparse_moe\.experts\.3\.w2"):
        load_weights(model, tmp_path)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        ModelConfig.from_hf(tiny_config("qwen3_moe", num_experts_per_tok=9))
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf(tiny_config("gpt_neox", hidden_act="relu"))
    with pytest.raises(ValueError, match="with experts is not supported"):
        ModelConfig.from_hf(tiny_config("qwen3", num_experts=8))
    cfg = ModelConfig.from_hf(tiny_config("qwen3_moe"))
    with pytest.raises(ValueError, match="moe_intermediate_size"):
        dataclasses.replace(cfg, moe_intermediate_size=30).check_tp(4)


# ---- the engine on the Triton kernels (the kernels themselves: tests/test_moe_kernels.py) --

@pytest.mark.parametrize("arch", ["qwen3_moe", "gpt_neox"])
def test_engine_with_triton_kernels(checkpoints, reference, arch):
    """attention_backend="triton" turns on the fused kernels, the MoE one included."""
    try:
        from engine.layers.attention import resolve_backend
        resolve_backend("triton", "cpu")
    except (ImportError, ValueError) as e:
        pytest.skip(f"triton cannot run on the CPU here: {e}")
    llm, outs = generate(checkpoints[arch], PROMPTS[:2], attention_backend="triton",
                         max_num_batched_tokens=16, max_num_seqs=4)
    moe = [m for m in llm.model_runner.model.modules() if isinstance(m, FusedMoE)]
    assert all(m.fused for m in moe) and bool(moe) == (arch == "qwen3_moe")
    assert [o.token_ids for o in outs] == reference[arch][:2]


# ---- the twin: expert weights read by a step ------------------------------------------------

def test_experts_touched_is_the_uniform_routing_expectation():
    """E (1 - (1 - k/E)^T) against routing drawn at random (k distinct experts per token)."""
    import random
    cfg = conf_model("qwen3-30b-a3b")          # E = 128, k = 8
    e, k = cfg.num_experts, cfg.num_experts_per_tok
    rng = random.Random(0)
    for tokens in (1, 4, 16, 64, 256):
        drawn = [len({x for _ in range(tokens) for x in rng.sample(range(e), k)})
                 for _ in range(200)]
        assert abs(sum(drawn) / len(drawn) - cfg.experts_touched(tokens)) < 0.02 * e
    assert cfg.experts_touched(1) == pytest.approx(k)
    assert cfg.experts_touched(10_000) == pytest.approx(e)
    assert conf_model("qwen3-8b").experts_touched(64) == 0


def test_matmul_weights_read_grow_with_batch_from_active_to_total():
    cfg = conf_model("qwen3-30b-a3b")
    reads = [cfg.matmul_weights_read(t) for t in (1, 8, 64, 256, 100_000)]
    assert reads == sorted(reads) and len(set(reads)) == len(reads)
    assert reads[0] == pytest.approx(cfg.active_matmul_params)
    all_matmul = cfg.active_matmul_params + len(cfg.moe_layers) * (
        cfg.num_experts - cfg.num_experts_per_tok) * cfg.expert_params
    assert reads[-1] == pytest.approx(all_matmul)
    dense = conf_model("qwen3-8b")
    assert dense.matmul_weights_read(1) == dense.matmul_weights_read(256) == \
        dense.active_matmul_params


def test_roofline_decode_bytes_follow_batch_size():
    """A decode step of Qwen3-30B-A3B on the H200 roofline: weight-bound at small batches, so
    its time grows with the distinct experts the batch touches (a dense model's would not)."""
    from simulator import HardwareSpec, ModelSpec, RooflineCostModel
    hw = HardwareSpec(**yaml.safe_load(open(MODEL_CONF_DIR.parent / "hardware" / "h200.yaml")))

    def decode(batch):
        return {"num_seqs": batch, "num_batched_tokens": batch, "num_prefill_tokens": 0,
                "num_decode_seqs": batch, "num_sampled": batch, "decode_context_tokens": batch,
                "decode_distinct_context_tokens": batch, "prefill_context_tokens": 0, "prefill_kv_tokens": 0, "prefill_attention_pairs": 0,
                "max_context_tokens": 1}
    data = yaml.safe_load((MODEL_CONF_DIR / "qwen3-30b-a3b.yaml").read_text())["hf_config"]
    moe = RooflineCostModel(ModelSpec.from_hf_config(data, "qwen3-30b-a3b"), hw)
    times = [moe.predict(decode(b)) for b in (1, 8, 64)]
    assert times == sorted(times) and times[-1] > 1.5 * times[0]
    cfg = conf_model("qwen3-30b-a3b")
    extra_bytes = (cfg.matmul_weights_read(64) - cfg.matmul_weights_read(1)) * cfg.dtype_bytes
    assert times[2] - times[0] >= 0.9 * extra_bytes / hw.bandwidth
    dense_data = yaml.safe_load((MODEL_CONF_DIR / "qwen3-8b.yaml").read_text())["hf_config"]
    dense = RooflineCostModel(ModelSpec.from_hf_config(dense_data, "qwen3-8b"), hw)
    assert dense.predict(decode(8)) - dense.predict(decode(1)) < 0.1 * (times[1] - times[0])
