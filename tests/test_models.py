"""The model side of the engine against Hugging Face transformers, on the CPU in float32.

Each tiny architecture is written as a random safetensors checkpoint by our writer, loaded
by transformers and by our loader, and run through our model as one flattened varlen batch
over a paged KV cache with shuffled block tables (block_size 4), so paging, the causal
offset and GQA are all exercised.
"""
import dataclasses
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
import yaml
from safetensors.torch import load_file, save_file

from engine.checkpoint import MODEL_CONF_DIR, hf_tensor_shapes, tiny_config, write_random_checkpoint
from engine.layers.attention import AttentionMetadata
from engine.loader import load_weights
from engine.models import ModelConfig, build_model

ARCHS = ["qwen3", "qwen2", "llama", "mistral"]
TOL = dict(rtol=1e-4, atol=1e-4)
STD = 0.1  # larger than the 0.02 default so attention is far from uniform


def hf_model(path):
    major = int(transformers.__version__.split(".")[0])
    dtype_kw = {"dtype": torch.float32} if major >= 5 else {"torch_dtype": torch.float32}
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, output_loading_info=True, **dtype_kw)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def our_model(path, cfg=None, **kw):
    model = build_model(cfg or ModelConfig.from_pretrained(path), torch.float32, "cpu", **kw)
    load_weights(model, path)
    return model


class PagedKV:
    """A paged KV pool for `model`; every sequence gets blocks in a random order."""

    def __init__(self, model, num_blocks=64, block_size=4, seed=0):
        self.model, self.block_size = model, block_size
        for attn in model.attention_layers():
            attn.k_cache = torch.zeros(num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
            attn.v_cache = torch.zeros_like(attn.k_cache)
        g = torch.Generator().manual_seed(seed)
        self.free = torch.randperm(num_blocks, generator=g).tolist()
        self.tables = {}

    def metadata(self, work):
        """work: list of (seq key, token ids, start, n), decodes (n == 1) first."""
        bs = self.block_size
        ids, positions, slots, ctx, starts = [], [], [], [], [0]
        for key, tokens, start, n in work:
            table = self.tables.setdefault(key, [])
            while len(table) * bs < start + n:
                table.append(self.free.pop())
            ids += tokens[start:start + n]
            positions += range(start, start + n)
            slots += [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            ctx.append(start + n)
            starts.append(starts[-1] + n)
        width = max(len(self.tables[key]) for key, *_ in work)
        tables = [self.tables[key] + [-1] * (width - len(self.tables[key])) for key, *_ in work]
        num_decode = 0
        while num_decode < len(work) and work[num_decode][3] == 1:
            num_decode += 1
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            max_query_len=max(n for *_, n in work), max_context_len=max(ctx),
            num_decode_tokens=num_decode)
        return torch.tensor(ids), torch.tensor(positions), meta

    @torch.no_grad()
    def step(self, work, meta_fn=None):
        """Run one forward; returns each sequence's logits for its new tokens."""
        ids, positions, meta = self.metadata(work)
        if meta_fn:
            meta = meta_fn(meta)
        logits = self.model.compute_logits(self.model(ids, positions, meta))
        return list(logits.split([n for *_, n in work]))


def prompts(vocab, lens=(5, 13, 10), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lens]


@pytest.fixture(scope="module", params=ARCHS)
def ckpt(request, tmp_path_factory):
    arch = request.param
    path = tmp_path_factory.mktemp(arch)
    # llama is written in several shards, so both loaders read an index
    shard = 20_000 if arch == "llama" else 4 << 30
    write_random_checkpoint(tiny_config(arch), path, dtype="float32", seed=1, std=STD,
                            max_shard_bytes=shard)
    return arch, path


@pytest.fixture(scope="module")
def hf_logits(ckpt):
    _, path = ckpt
    hf = hf_model(path)
    with torch.no_grad():
        return [hf(torch.tensor([p])).logits[0] for p in prompts(hf.config.vocab_size)]


def test_varlen_paged_forward_matches_hf(ckpt, hf_logits):
    arch, path = ckpt
    model = our_model(path)
    ps = prompts(model.config.vocab_size)
    out = PagedKV(model).step([(i, p, 0, len(p)) for i, p in enumerate(ps)])
    for i, (ours, ref) in enumerate(zip(out, hf_logits)):
        torch.testing.assert_close(ours, ref, **TOL, msg=f"{arch} prompt {i}")


def test_chunked_prefill_and_decode_match_hf(ckpt, hf_logits):
    """Prompts computed in pieces (a prefix chunk, then the rest in a step that mixes
    decode-shaped steps with a chunk) give the one-shot logits: each piece attends to the
    cached earlier ones."""
    arch, path = ckpt
    model = our_model(path)
    a, b, c = prompts(model.config.vocab_size)
    kv = PagedKV(model, seed=1)
    first = kv.step([("a", a, 0, len(a) - 1), ("b", b, 0, 6), ("c", c, 0, len(c) - 1)])
    # step 2: a and c compute only their last token (q_len 1, ordered first: the decode
    # path), b its second chunk
    second = kv.step([("a", a, len(a) - 1, 1), ("c", c, len(c) - 1, 1), ("b", b, 6, len(b) - 6)])
    second = [second[0], second[2], second[1]]
    for name, ref, one, two in zip("abc", hf_logits, first, second):
        torch.testing.assert_close(torch.cat([one, two]), ref, **TOL, msg=f"{arch} prompt {name}")


def test_wrong_block_table_changes_logits(ckpt, hf_logits):
    """Negative control: the comparison above really depends on reading the right blocks."""
    _, path = ckpt
    model = our_model(path)
    ps = prompts(model.config.vocab_size)

    def swap_first_two_blocks(meta):
        meta.block_tables[2, [0, 1]] = meta.block_tables[2, [1, 0]]
        return meta

    out = PagedKV(model).step([(i, p, 0, len(p)) for i, p in enumerate(ps)], swap_first_two_blocks)
    torch.testing.assert_close(out[0], hf_logits[0], **TOL)  # untouched sequence
    assert (out[2] - hf_logits[2]).abs().max() > 1e-2


def test_forward_without_kv_cache_matches_hf(ckpt, hf_logits):
    """Before the runner assigns caches (e.g. a warm-up run) prompts attend to themselves."""
    _, path = ckpt
    model = our_model(path)
    ps = prompts(model.config.vocab_size)
    ids = torch.tensor(sum(ps, []))
    positions = torch.cat([torch.arange(len(p)) for p in ps])
    starts = torch.tensor([0, 5, 18, 28], dtype=torch.int32)
    meta = AttentionMetadata(slot_mapping=torch.full((28,), -1),
                             block_tables=torch.empty(3, 0, dtype=torch.int32),
                             context_lens=starts.diff(), query_start_loc=starts,
                             max_query_len=13, max_context_len=13)
    with torch.no_grad():
        logits = model.compute_logits(model(ids, positions, meta))
    torch.testing.assert_close(logits, torch.cat(hf_logits), **TOL)
    meta.context_lens = meta.context_lens + 1  # a cached prefix needs the cache
    with pytest.raises(ValueError, match="without a KV cache"):
        model(ids, positions, meta)


def test_llama3_rope_scaling_matters(tmp_path):
    """Negative control for rope scaling: dropping it changes the logits."""
    write_random_checkpoint(tiny_config("llama"), tmp_path, dtype="float32", std=STD)
    p = prompts(512, lens=(40,))[0]
    ref = hf_model(tmp_path)(torch.tensor([p])).logits[0].detach()
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg.rope_type == "llama3"
    for rope_type, close in (("llama3", True), ("default", False)):
        model = our_model(tmp_path, dataclasses.replace(cfg, rope_type=rope_type))
        out = PagedKV(model).step([(0, p, 0, len(p))])[0]
        assert torch.allclose(out, ref, **TOL) == close, rope_type


def _tp_worker(rank, world_size, path, store, result):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world_size)
    try:
        model = build_model(ModelConfig.from_pretrained(path), torch.float32, "cpu",
                            tp_rank=rank, tp_size=world_size)
        load_weights(model, path)
        ps = prompts(model.config.vocab_size)
        out = PagedKV(model).step([(i, p, 0, len(p)) for i, p in enumerate(ps)])
        torch.save(out, f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_matches_single_rank(world_size, tmp_path):
    """TP over gloo on the CPU: every rank gets the full logits of the unsplit model. With
    4 ranks and 2 KV heads each KV head is replicated on two ranks. Qwen2 with tied
    embeddings covers column biases, the row-parallel bias and the vocab-parallel head."""
    path = write_random_checkpoint(tiny_config("qwen2", tie_word_embeddings=True),
                                   tmp_path / "ckpt", dtype="float32", std=STD)
    ref = hf_model(path)
    with torch.no_grad():
        ref = [ref(torch.tensor([p])).logits[0] for p in prompts(512)]
    mp.spawn(_tp_worker, args=(world_size, str(path), str(tmp_path / "store"),
                               str(tmp_path / "out")), nprocs=world_size, join=True)
    for rank in range(world_size):
        for ours, theirs in zip(torch.load(tmp_path / f"out.{rank}"), ref):
            torch.testing.assert_close(ours, theirs, **TOL, msg=f"rank {rank}")


@pytest.mark.parametrize("arch", ARCHS)
def test_config_resaved_by_transformers_reads_the_same(arch, tmp_path):
    """transformers v5 rewrites rope_theta/rope_scaling as rope_parameters and torch_dtype
    as dtype; both spellings give the same ModelConfig."""
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(arch)))
    transformers.AutoConfig.from_pretrained(tmp_path).save_pretrained(tmp_path / "resaved")
    assert (ModelConfig.from_pretrained(tmp_path / "resaved")
            == ModelConfig.from_pretrained(tmp_path))


def test_loader_names_missing_tensor(tmp_path):
    write_random_checkpoint(tiny_config("qwen3"), tmp_path, dtype="float32")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    model = build_model(ModelConfig.from_pretrained(tmp_path), torch.float32, "cpu")
    with pytest.raises(ValueError,
                       match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_weights(model, tmp_path)


def test_loader_names_bad_shape_and_unknown_tensor(tmp_path):
    write_random_checkpoint(tiny_config("mistral"), tmp_path, dtype="float32")
    file = tmp_path / "model.safetensors"
    tensors = load_file(file)
    model = build_model(ModelConfig.from_pretrained(tmp_path), torch.float32, "cpu")
    bad = dict(tensors, **{"model.layers.0.self_attn.k_proj.weight": torch.zeros(3, 64)})
    save_file(bad, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(3, 64\)"):
        load_weights(model, tmp_path)
    extra = dict(tensors, **{"model.layers.0.mlp.experts.weight": torch.zeros(2)})
    save_file(extra, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.experts"):
        load_weights(model, tmp_path)


def test_loader_rejects_checkpoint_of_another_model(tmp_path):
    write_random_checkpoint(tiny_config("llama"), tmp_path, dtype="float32")
    model = build_model(ModelConfig.from_hf(tiny_config("llama", num_hidden_layers=3)),
                        torch.float32, "cpu")
    with pytest.raises(ValueError, match="num_hidden_layers: 2 vs 3"):
        load_weights(model, tmp_path)


def test_unknown_architecture_is_rejected(tmp_path):
    config = tiny_config("llama", architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        ModelConfig.from_hf(config)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        write_random_checkpoint(config, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json: unsupported architecture"):
        ModelConfig.from_pretrained(tmp_path)


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf(tiny_config("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf(tiny_config("qwen2", num_key_value_heads=3))
    cfg = ModelConfig.from_hf(tiny_config("mistral", sliding_window=64))
    with pytest.raises(ValueError, match="sliding-window"):
        build_model(cfg, torch.float32, "cpu")
    build_model(cfg, torch.float32, "cpu", max_model_len=64)  # window covers every position
    with pytest.raises(ValueError, match="num_attention_heads \\(4\\) must be divisible"):
        build_model(ModelConfig.from_hf(tiny_config("qwen3")), torch.float32, "cpu", tp_size=3)
    with pytest.raises(ValueError, match="unknown attention backend"):
        build_model(ModelConfig.from_hf(tiny_config("qwen3")), torch.float32, "cpu",
                    attention_backend="xformers")


def test_sharded_checkpoint_has_complete_index(tmp_path):
    write_random_checkpoint(tiny_config("llama"), tmp_path, dtype="bfloat16",
                            max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    cfg = ModelConfig.from_pretrained(tmp_path)
    assert cfg.dtype == "bfloat16"
    shapes = hf_tensor_shapes(cfg)
    assert set(index["weight_map"]) == set(shapes)
    tensors = {k: v for f in files for k, v in load_file(tmp_path / f).items()}
    assert {k: tuple(v.shape) for k, v in tensors.items()} == shapes
    assert all(v.dtype == torch.bfloat16 for v in tensors.values())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())


@pytest.mark.parametrize("file", sorted(MODEL_CONF_DIR.glob("*.yaml")), ids=lambda f: f.stem)
def test_conf_model_yaml_is_a_valid_hf_config(file):
    data = yaml.safe_load(file.read_text())
    assert data["name"] == file.stem
    cfg = ModelConfig.from_hf(data["hf_config"])
    cfg.check_tp(8 if "70b" in file.stem else 1)
    assert cfg.sliding_window is None
    assert cfg.dtype == ("float16" if file.stem.startswith("pythia") else "bfloat16")   # as shipped


def conf_model(name):
    data = yaml.safe_load((MODEL_CONF_DIR / f"{name}.yaml").read_text())
    return ModelConfig.from_hf(data["hf_config"])


def test_conf_model_sizes():
    """The yaml shapes give the published parameter counts (HF model cards) and KV sizes."""
    def count(name):
        return sum(torch.Size(s).numel() for s in hf_tensor_shapes(conf_model(name)).values())
    assert count("qwen3-0.6b") == 596_049_920
    assert count("llama-3.1-8b") == 8_030_261_248
    assert count("mistral-7b") == 7_248_023_552
    assert round(count("llama-3.1-70b") / 1e9, 1) == 70.6
    assert round(count("qwen2.5-7b") / 1e9, 2) == 7.62
    assert round(count("qwen3-8b") / 1e9, 1) == 8.2
    assert conf_model("qwen3-0.6b").kv_cache_bytes_per_token(2) == 28 * 2 * 8 * 128 * 2
    llama70 = conf_model("llama-3.1-70b")
    assert llama70.kv_cache_bytes_per_token(2, tp_size=8) * 8 == llama70.kv_cache_bytes_per_token(2)
    assert llama70.num_kv_heads_per_rank(8) == 1
