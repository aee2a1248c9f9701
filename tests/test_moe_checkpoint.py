"""Random checkpoints drawn at load time (`python -m engine.checkpoint ... --draw-at-load`):
no weight files, the same tensors as the written checkpoint, through the loader's own name
mapping and weight loaders (tensor-parallel slices included)."""
import json

import pytest
import torch

from engine.checkpoint import RECIPE_FILE, main as checkpoint_main, tiny_config, write_random_checkpoint
from engine.loader import load_weights
from engine.models import ModelConfig, build_model


def built(path, rank=0, tp=1):
    cfg = ModelConfig.from_pretrained(path)
    return build_model(cfg, torch.float32, torch.device("cpu"), rank, tp, "torch", 128)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_drawn_at_load_equals_the_written_checkpoint(tmp_path, arch):
    config = tiny_config(arch)
    files = write_random_checkpoint(config, tmp_path / "files", dtype="float32", seed=3,
                                    std=0.1, device="cpu", progress=False, max_shard_bytes=1 << 16)
    recipe = write_random_checkpoint(config, tmp_path / "recipe", dtype="float32", seed=3,
                                     std=0.1, device="cpu", progress=False, files=False)
    assert len(list(files.glob("*.safetensors"))) > 1          # sharded: the writer flushed
    assert not list(recipe.glob("*.safetensors")) and (recipe / RECIPE_FILE).is_file()
    assert json.loads((recipe / "config.json").read_text()) == json.loads((files / "config.json").read_text())
    for rank in range(2):    # each rank of TP=2 draws every tensor and keeps its slice
        a, b = built(files, rank, 2), built(recipe, rank, 2)
        load_weights(a, files)
        load_weights(b, recipe)
        pa, pb = params(a), params(b)
        assert pa.keys() == pb.keys()
        for name in pa:
            assert torch.equal(pa[name], pb[name]), name
    other = write_random_checkpoint(config, tmp_path / "other", dtype="float32", seed=4,
                                    std=0.1, device="cpu", progress=False, files=False)
    c = built(other)
    load_weights(c, other)
    d = built(recipe)
    load_weights(d, recipe)
    assert not torch.equal(params(c)["model.embed_tokens.weight"], params(d)["model.embed_tokens.weight"])


def test_rewrite_leaves_no_stale_weights(tmp_path, capsys):
    path = tmp_path / "ckpt"
    checkpoint_main(["tiny-qwen3_moe", str(path), "--dtype", "float32", "--device", "cpu"])
    assert list(path.glob("*.safetensors"))
    checkpoint_main(["tiny-qwen3_moe", str(path), "--dtype", "float32", "--device", "cpu",
                     "--draw-at-load"])
    assert "drawn at load time" in capsys.readouterr().out
    assert not list(path.glob("*.safetensors")) and (path / RECIPE_FILE).is_file()
    model = built(path)
    load_weights(model, path)     # loads from the recipe, not from a leftover file
    (path / RECIPE_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors files \(nor random_weights\.json\)"):
        load_weights(built(path), path)


def test_a_conf_model_named_tiny_is_the_conf_model(tmp_path):
    """`tiny-qwen3-moe` is a conf/model entry: the CLI writes its config, not TINY's arch."""
    checkpoint_main(["tiny-qwen3-moe", str(tmp_path), "--draw-at-load"])
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_experts"] == 16 and config["vocab_size"] == 151936
