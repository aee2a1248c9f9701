"""policy.model reads config.json as transformers does: for every architecture, with keys
missing or present, its description equals what transformers' own config class makes of
the same dict; and it refuses what the engine cannot run."""
import random
from pathlib import Path

import pytest
import yaml

from policy.model import ARCHITECTURES, ModelConfig

transformers = pytest.importorskip("transformers")
CONF = Path(__file__).resolve().parents[1] / "conf" / "model"
CONF_MODELS = {p.stem: yaml.safe_load(p.read_text())["hf_config"] for p in sorted(CONF.glob("*.yaml"))}


def hf_view(d: dict) -> dict:
    """What transformers' config class for d's architecture makes of d."""
    arch = d["architectures"][0]
    cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    c = cls(**{k: v for k, v in d.items() if k != "architectures"})
    heads = c.num_attention_heads
    layer_types = getattr(c, "layer_types", None)
    window = getattr(c, "sliding_window", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    rope = c.rope_parameters or {}
    return {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": heads,
            "num_key_value_heads": getattr(c, "num_key_value_heads", heads),   # GPT-NeoX: MHA
            "head_dim": getattr(c, "head_dim", None) or c.hidden_size // heads,
            "max_position_embeddings": c.max_position_embeddings,
            "rms_norm_eps": getattr(c, "rms_norm_eps", None) or getattr(c, "layer_norm_eps", None),
            "num_experts": getattr(c, "num_experts", None) or getattr(c, "num_local_experts", 0),
            "num_experts_per_tok": getattr(c, "num_experts_per_tok", 0),
            "tie_word_embeddings": c.tie_word_embeddings, "rope_theta": rope.get("rope_theta"),
            "sliding_window": window, "bos_token_id": c.bos_token_id}


def our_view(d: dict) -> dict:
    m = ModelConfig.from_hf(d)
    return {k: getattr(m, k) for k in hf_view(d)} if m else None


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_defaults_are_transformers_defaults(arch):
    d = {"architectures": [arch]}
    assert our_view(d) == hf_view(d)


@pytest.mark.parametrize("name", sorted(CONF_MODELS))
def test_shipped_models_and_any_missing_keys_read_as_transformers_reads_them(name):
    full = CONF_MODELS[name]
    rng = random.Random(name)
    keys = [k for k in full if k != "architectures"]
    cases = [full] + [{k: v for k, v in full.items() if k == "architectures" or rng.random() < 0.5}
                      for _ in range(6)]
    for d in cases:
        if ("num_attention_heads" in d) != ("num_key_value_heads" in d):
            continue     # one head count defaulted, the other not: not a model anyone ships
        assert our_view(d) == hf_view(d), sorted(set(keys) - set(d))


def test_sliding_windows_follow_each_architecture():
    qwen = {"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 4, "sliding_window": 64}
    assert ModelConfig.from_hf(qwen).sliding_window is None                 # use_sliding_window off
    assert ModelConfig.from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 2}).sliding_window == 64
    assert ModelConfig.from_hf({**qwen, "use_sliding_window": True, "max_window_layers": 4}).sliding_window is None
    mistral = {"architectures": ["MistralForCausalLM"]}
    assert ModelConfig.from_hf(mistral).sliding_window == 4096               # transformers' default
    assert ModelConfig.from_hf({**mistral, "sliding_window": None}).sliding_window is None
    for d in ({**qwen, "use_sliding_window": True, "max_window_layers": 2}, {**mistral, "sliding_window": 4096}):
        assert our_view(d)["sliding_window"] == hf_view(d)["sliding_window"]


@pytest.mark.parametrize("extra,message", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"num_experts": 8}, "mixture-of-experts"),
    ({"quantization_config": {"quant_method": "awq", "bits": 8}}, "quantization_config.bits"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
])
def test_refuses_what_the_engine_cannot_run(extra, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], **extra})
    with pytest.raises(ValueError, match="unsupported architecture"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})
