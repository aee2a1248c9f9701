"""4-bit GPTQ / AWQ weights: the checkpoint writer's layouts read back by the reference
dequantization and by the formats' own code (AutoGPTQ's pack and forward, AutoAWQ's
unpacking) where it is installed, the config checks,
tensor-parallel slicing, and greedy generation of a quantized tiny model equal to that of
the same model with its weights dequantized to fp32 (TP=1 and TP=2 over gloo)."""
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere

import pytest
import torch

from engine import LLM, SamplingParams
from engine.checkpoint import (pack_cols, pack_rows, quantization_config, quantize_rtn,
                               quantized_tensors, tiny_config, write_dequantized_checkpoint,
                               write_random_checkpoint)
from engine.layers.quant import AWQ_ORDER, dequantize, dequantize_awq, dequantize_gptq
from engine.loader import load_weights
from engine.models import ModelConfig, build_model
from policy.quantization import QuantConfig

STD = 0.3   # as tests/test_engine.py: outputs depend on the whole context
CPU = dict(device="cpu", dtype="float32", attention_backend="torch")
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5 + i for i in range(n)] for n in (3, 9, 21)]

# name -> (tiny architecture, quantization_config)
VARIANTS = {
    "gptq": ("llama", quantization_config("gptq", 32)),
    "gptq-act-order": ("llama", quantization_config("gptq", 32, desc_act=True)),
    "gptq-v2-asym": ("qwen3", quantization_config("gptq", -1, sym=False,
                                                  checkpoint_format="gptq_v2")),
    "awq": ("qwen2", quantization_config("awq", 32)),     # with q/k/v biases
}


def quant(variant: str) -> QuantConfig:
    return QuantConfig.from_hf(VARIANTS[variant][1])


# ---- layouts ------------------------------------------------------------------------------
def test_packing_matches_the_documented_bit_positions():
    """GPTQ qweight: row 8i+k of the input in bits 4k..4k+3 of word i (rows 0..7 holding
    1..8 give 0x87654321); AWQ GEMM: bits 4k.. hold column order[k] = (0,2,4,6,1,3,5,7)."""
    rows = torch.arange(1, 9).view(8, 1)
    assert pack_rows(rows).item() == 0x87654321 - 2**32            # int32 bits
    cols = torch.arange(8).view(1, 8)
    assert pack_cols(cols).item() == 0x76543210
    assert pack_cols(cols, AWQ_ORDER).item() == 0x75316420


@pytest.mark.parametrize("variant", ["gptq", "gptq-act-order", "gptq-v2-asym", "awq"])
def test_written_layout_dequantizes_to_the_rtn_weights(variant):
    """The writer's packed tensors have the published shapes and dtypes, and the reference
    dequantization gives back exactly the round-to-nearest weights, which are within half a
    quantization step of the originals."""
    q = quant(variant)
    out_features, in_features = 48, 64
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(1))
    perm = torch.randperm(in_features) if q.desc_act else None
    rtn = quantize_rtn(w, q, perm)
    t = {k.rsplit(".", 1)[1]: v for k, v in
         quantized_tensors("model.layers.0.mlp.down_proj.weight", w, q, perm).items()}
    groups = q.num_groups(in_features)
    if q.method == "gptq":
        assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == {
            "qweight": ((in_features // 8, out_features), torch.int32),
            "qzeros": ((groups, out_features // 8), torch.int32),
            "scales": ((groups, out_features), torch.float16),
            "g_idx": ((in_features,), torch.int32)}
        back = dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], q.zero_offset)
        if q.desc_act:   # rows of one group are scattered, each group holds group_size rows
            assert not torch.equal(t["g_idx"], torch.arange(in_features) // q.group_size)
            assert torch.bincount(t["g_idx"]).tolist() == [q.group_size] * groups
    else:
        assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == {
            "qweight": ((in_features, out_features // 8), torch.int32),
            "qzeros": ((groups, out_features // 8), torch.int32),
            "scales": ((groups, out_features), torch.float16)}
        back = dequantize_awq(t["qweight"], t["qzeros"], t["scales"], q.group_size)
    assert torch.equal(back, rtn["weight"])
    g = rtn["g_idx"].long()
    step = rtn["scales"].float()[g].t()                              # [O, I]
    assert ((back - w).abs() <= step / 2 + 1e-6).float().mean() > 0.99  # clamping aside
    assert (back - w).abs().max() > 0                                 # it is quantized


def test_gptq_v1_stores_zero_minus_one():
    """checkpoint_format "gptq": the symmetric zero point 8 is stored as 7 in every nibble."""
    q = quant("gptq")
    t = quantized_tensors("x.weight", torch.randn(16, 32), q)
    assert (t["x.qzeros"] == 0x77777777).all()


FORMATS = Path(__file__).resolve().parents[1] / ".formats"   # .ci/run's --target install


def _package_dir(package: str) -> Path | None:
    """Where a format's own package is: .formats/ (off the import path: auto-gptq's wheel has a
    top-level `tests` package that would shadow this one), else the environment; None if neither."""
    if (FORMATS / package).is_dir():
        return FORMATS / package
    spec = importlib.util.find_spec(package)
    return Path(spec.submodule_search_locations[0]) if spec else None


def _packing_module(package: str, relpath: str, name: str):
    """A format's own packing code, one file of its package loaded alone (the packages'
    __init__ need CUDA extensions and dependencies the tests do not install)."""
    path = _package_dir(package) / relpath
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(_package_dir("awq") is None, reason="autoawq not installed "
                    "(pip install --no-deps --target .formats autoawq==0.2.9, as .ci/run does)")
def test_awq_layout_against_autoawq():
    """AutoAWQ's own unpack-and-dequantize (awq/utils/packing_utils.py, torch only) reads
    the writer's AWQ tensors as the same weights."""
    packing = _packing_module("awq", "utils/packing_utils.py", "awq_packing_utils")
    q = quant("awq")
    w = torch.randn(64, 96)
    rtn = quantize_rtn(w, q)
    t = quantized_tensors("x.weight", w, q)
    theirs = packing.dequantize_gemm(t["x.qweight"], t["x.qzeros"], t["x.scales"].float(), 4,
                                     q.group_size)
    assert torch.equal(theirs.t().float(), rtn["weight"])


@pytest.mark.skipif(_package_dir("auto_gptq") is None, reason="auto-gptq not installed "
                    "(pip install --no-deps --target .formats auto-gptq==0.7.1, as .ci/run does)")
@pytest.mark.parametrize("group_size,desc_act,sym", [(32, False, True), (32, True, True),
                                                     (-1, False, True), (32, False, False)])
def test_gptq_layout_against_autogptq(group_size, desc_act, sym):
    """AutoGPTQ's own QuantLinear (auto_gptq/nn_modules/qlinear/qlinear_cuda.py, whose CPU
    path is torch) both ways: its pack() of the round-to-nearest weights, scales, zero points
    and g_idx writes the writer's qweight and qzeros bit for bit (the stored zero - 1 of
    checkpoint_format "gptq" included), and its forward reads the writer's tensors, act-order
    g_idx included, as the same weights."""
    qlinear = _packing_module("auto_gptq", "nn_modules/qlinear/qlinear_cuda.py", "autogptq_qlinear")
    q = QuantConfig.from_hf(quantization_config("gptq", group_size, desc_act=desc_act, sym=sym))
    out_features, in_features = 64, 128
    w = torch.randn(out_features, in_features)
    perm = torch.randperm(in_features) if desc_act else None
    rtn = quantize_rtn(w, q, perm)
    ours = {k.rsplit(".", 1)[1]: v for k, v in quantized_tensors("x.weight", w, q, perm).items()}

    packed = qlinear.QuantLinear(4, group_size, in_features, out_features, bias=False)
    dense = torch.nn.Linear(in_features, out_features, bias=False)
    dense.weight.data = rtn["weight"].clone()
    packed.pack(dense, rtn["scales"].float().t(), rtn["zeros"].float().t(), g_idx=rtn["g_idx"])
    assert torch.equal(packed.qweight, ours["qweight"])
    assert torch.equal(packed.qzeros, ours["qzeros"])

    reader = qlinear.QuantLinear(4, group_size, in_features, out_features, bias=False)
    reader.qweight, reader.qzeros, reader.g_idx = ours["qweight"], ours["qzeros"], ours["g_idx"]
    reader.scales = ours["scales"].float()    # fp32: their product (q - z) * s is then exact
    theirs = reader(torch.eye(in_features))   # x @ W^T with x = I: W^T [I, O]
    assert torch.equal(theirs.t(), rtn["weight"])


# ---- config -------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,field", [
    ({"quant_method": "gptq", "bits": 3}, "bits"),
    ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "checkpoint_format"),
    ({"quant_method": "gptq", "is_marlin_format": True}, "is_marlin_format"),
    ({"quant_method": "gptq", "exllama_config": {"version": 1}}, "exllama_config"),
    ({"quant_method": "gptq", "group_size": 100}, "group_size"),
    ({"quant_method": "awq", "version": "gemv"}, "version"),
    ({"quant_method": "awq", "zero_point": False}, "zero_point"),
    ({"quant_method": "fp8"}, "quant_method"),
    ({"quant_method": "gptq", "lm_head": True}, "lm_head"),
    ({"quant_method": "gptq", "dynamic": {"-:.*down_proj": {}}}, "dynamic"),
    ({"quant_method": "awq", "modules_to_not_convert": ["mlp.gate"]}, "modules_to_not_convert"),
])
def test_unsupported_variants_are_refused_naming_the_field(extra, field):
    with pytest.raises(ValueError, match=f"quantization_config.{field}"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "quantization_config": extra})


def test_model_config_reads_quantization_and_weight_bytes():
    dense = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "torch_dtype": "float16"})
    q = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "torch_dtype": "float16",
                             "quantization_config": quantization_config("gptq", 128, True)})
    assert q.quantization == QuantConfig("gptq", 4, 128, True, True, 1)
    linear = dense.num_hidden_layers * dense.layer_matmul_params
    saved = dense.weight_bytes - q.weight_bytes
    # 4 bits instead of 16 per linear weight, less the group scales/zeros and g_idx
    assert 0.7 * linear * 2 < saved < linear * 2 * 0.75
    assert dense.weight_bytes == dense.num_params * 2


# ---- tensor parallelism -------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    paths = {}
    for variant, (arch, qc) in VARIANTS.items():
        path = write_random_checkpoint(tiny_config(arch), root / variant, dtype="float16",
                                       std=STD, progress=False, quantization=qc)
        paths[variant] = (str(path), str(write_dequantized_checkpoint(path, root / f"{variant}-fp32")))
    return paths


def _dense_layers(path: str) -> dict:
    model = build_model(ModelConfig.from_pretrained(path), torch.float32)
    load_weights(model, path)
    return {n: p for n, p in model.named_parameters() if n.endswith("_proj.weight")}


@pytest.mark.parametrize("variant", ["gptq", "gptq-act-order", "awq"])
def test_tensor_parallel_slices_dequantize_to_the_dense_slices(checkpoints, variant):
    """Each rank's packed tensors dequantize to its slice of the dense model's fused and
    split weights (columns for qkv / gate_up, rows for o / down, groups with them)."""
    quantized, dense_path = checkpoints[variant]
    dense = _dense_layers(dense_path)
    cfg = ModelConfig.from_pretrained(quantized)
    ranks = []
    for rank in range(2):
        model = build_model(cfg, torch.float32, tp_rank=rank, tp_size=2)
        assert not any(p.is_meta for p in model.parameters())   # dense weights never made
        load_weights(model, quantized)
        ranks.append({n: m for n, m in model.named_modules() if getattr(m, "quant", None)})
    assert len(ranks[0]) == 4 * cfg.num_hidden_layers
    for name, layer in ranks[0].items():
        parts = [dequantize(r[name]) for r in ranks]
        full = dense[f"{name}.weight"]
        if name.endswith(("o_proj", "down_proj")):
            assert torch.equal(torch.cat(parts, dim=1), full)
        elif name.endswith("gate_up_proj"):
            half = [p.chunk(2) for p in parts]      # [gate_r, up_r] on each rank
            assert torch.equal(torch.cat([half[0][0], half[1][0], half[0][1], half[1][1]]), full)
        else:   # qkv: q heads split, 2 kv heads -> one per rank
            q, kv = cfg.q_size // 2, cfg.kv_size // 2
            split = [p.split([q, kv, kv]) for p in parts]
            assert torch.equal(torch.cat([s[i] for i in range(3) for s in split]), full)


def test_tensor_parallel_refuses_groups_that_cannot_split(tmp_path):
    """o_proj's 64 inputs split over 2 ranks are 32 each: groups of 64 cannot follow."""
    cfg = ModelConfig.from_hf({**tiny_config("llama"),
                               "quantization_config": quantization_config("gptq", 64)})
    with pytest.raises(ValueError, match="o_proj: quantization_config.group_size=64"):
        build_model(cfg, torch.float32, tp_rank=0, tp_size=2)
    # act-order keeps every group on every rank: it splits
    cfg = ModelConfig.from_hf({**tiny_config("llama"),
                               "quantization_config": quantization_config("gptq", 64, True)})
    build_model(cfg, torch.float32, tp_rank=1, tp_size=2)


def test_loader_rejects_a_checkpoint_in_another_layout(checkpoints, tmp_path):
    """A GPTQ checkpoint whose config says AWQ fails on the first packed tensor's shape."""
    path, _ = checkpoints["gptq"]
    cfg = ModelConfig.from_hf({**tiny_config("llama"),
                               "quantization_config": quantization_config("awq", 32)})
    model = build_model(cfg, torch.float32)
    with pytest.raises(ValueError, match="describes another model|qweight"):
        load_weights(model, path)


# ---- generation ---------------------------------------------------------------------------
def _generate(path, **kwargs):
    with LLM(path, **CPU, num_gpu_blocks=128, max_model_len=64, **kwargs) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def dense_outputs(checkpoints):
    """variant -> greedy outputs of its dequantized fp32 model (computed once)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cache[variant] = _generate(checkpoints[variant][1])
        return cache[variant]
    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_greedy_generation_equals_the_dequantized_model(checkpoints, dense_outputs, variant):
    ours = _generate(checkpoints[variant][0])
    assert ours == dense_outputs(variant)
    assert len({t for out in ours for t in out}) > 10     # the comparison means something


@pytest.mark.distributed
@pytest.mark.parametrize("variant", ["gptq-act-order", "awq"])
def test_greedy_generation_tensor_parallel_gloo(checkpoints, dense_outputs, variant):
    assert _generate(checkpoints[variant][0], tensor_parallel_size=2) == dense_outputs(variant)


# ---- Triton W4A16 kernels on real layers (TRITON_INTERPRET=1; the kernels alone: ---------
# ---- tests/test_quant_kernels.py) ---------------------------------------------------------
@pytest.mark.parametrize("variant", ["gptq", "gptq-act-order", "awq"])
def test_w4a16_layers_of_a_tensor_parallel_rank(checkpoints, variant):
    """The default launches (skinny at 2 rows, tiled at 70) on every quantized layer of rank 1
    of 2 (local groups of o/down, act-order g_idx into all groups, fused qkv / gate_up, q/k/v
    biases) equal the torch path."""
    from engine.kernels.w4a16 import w4a16_linear
    from engine.layers import quant as quant_layers
    quantized, _ = checkpoints[variant]
    model = build_model(ModelConfig.from_pretrained(quantized), torch.float32, tp_rank=1, tp_size=2)
    load_weights(model, quantized)
    layers = [m for m in model.modules() if getattr(m, "quant", None)]
    gen = torch.Generator().manual_seed(3)
    for i, layer in enumerate(layers):
        x = torch.randn(70 if i % 4 == 0 else 2, layer.in_features, generator=gen)
        torch.testing.assert_close(w4a16_linear(layer, x, layer.bias),
                                   quant_layers.linear(layer, x, layer.bias), rtol=1e-4, atol=1e-4)


# ---- the simulator follows the quantized model -----------------------------------------------
def test_simulator_weight_bytes_kv_pool_and_decode_cost_follow_quantization():
    """Llama-3.1-8B GPTQ / AWQ (conf/model): ~3.6x fewer linear-weight bytes, a KV pool larger
    by exactly the bytes the weights free, and a bandwidth-bound decode step that reads less."""
    import yaml
    from policy import Batch, Sequence
    from simulator import HardwareSpec, ModelSpec, RooflineCostModel
    from simulator.cost_model import kv_pool_blocks
    from engine.checkpoint import MODEL_CONF_DIR

    def spec(name):
        return ModelSpec.from_hf_config(
            yaml.safe_load((MODEL_CONF_DIR / f"{name}.yaml").read_text())["hf_config"], name)
    hw = HardwareSpec(**yaml.safe_load((MODEL_CONF_DIR.parent / "hardware" / "h200.yaml").read_text()))
    dense, gptq, awq = spec("llama-3.1-8b"), spec("llama-3.1-8b-gptq"), spec("llama-3.1-8b-awq")
    for q in (gptq, awq):
        ratio = dense.matmul_weight_bytes / q.matmul_weight_bytes
        assert 3.4 < ratio < 4.0      # 16 bits -> 4 bits + fp16 scale and 4-bit zero per 128
        assert q.weight_bytes == dense.weight_bytes - (dense.matmul_weight_bytes - q.matmul_weight_bytes)
        block = 16 * q.kv_bytes_per_token()
        grown = kv_pool_blocks(q, hw, 16, 0.9) - kv_pool_blocks(dense, hw, 16, 0.9)
        assert abs(grown - (dense.weight_bytes - q.weight_bytes) / block) <= 1

    batch = Batch()     # one sequence decoding at context 1k
    seq = Sequence(0, [1], 16)
    seq.num_tokens = 1025
    batch.seqs.append(seq)
    batch.num_new_tokens.append(1)
    batch.num_computed_tokens.append(1024)
    batch.sample.append(True)
    batch.num_batched_tokens, batch.num_decode_seqs = 1, 1
    # the ideal roofline, max(compute, memory): a weight-bound step saves exactly the bytes' time
    ideal = HardwareSpec(**{**yaml.safe_load((MODEL_CONF_DIR.parent / "hardware" / "h200.yaml").read_text()),
                            "roofline_exponent": float("inf")})
    t_dense = RooflineCostModel(dense, ideal).step_time(batch)
    t_gptq = RooflineCostModel(gptq, ideal).step_time(batch)
    saved = (dense.matmul_weight_bytes - gptq.matmul_weight_bytes) / hw.bandwidth
    assert t_dense - t_gptq == pytest.approx(saved, rel=1e-6)


def test_loader_refuses_a_g_idx_that_contradicts_desc_act(checkpoints, tmp_path):
    """An act-order checkpoint whose config says desc_act=false: the kernels would group rows
    as i // group_size; the loader refuses instead of computing something else."""
    import json
    import shutil
    path, _ = checkpoints["gptq-act-order"]
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["desc_act"] = False
    (bad / "config.json").write_text(json.dumps(config))
    model = build_model(ModelConfig.from_pretrained(bad), torch.float32)
    with pytest.raises(ValueError, match="g_idx.*desc_act"):
        load_weights(model, bad)
