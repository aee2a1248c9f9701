"""EngineConfig.attention_streams: which steps run their decode attention on a second stream
(the fork and join themselves need CUDA: benchmarks/check_gpu.py's `streams` case)."""
import pytest

torch = pytest.importorskip("torch")
checkpoint = pytest.importorskip("engine.checkpoint")

from engine import LLM, EngineConfig, SamplingParams  # noqa: E402
from engine.step_inputs import dummy_batch  # noqa: E402


def test_only_mixed_steps_off_pdl_get_the_side_stream(tmp_path):
    model = checkpoint.write_random_checkpoint(checkpoint.tiny_config("qwen3"), tmp_path / "m",
                                               dtype="float32", seed=0)
    llm = LLM(str(model), device="cpu", dtype="float32", attention_backend="torch",
              num_gpu_blocks=64, max_model_len=64, pdl_max_tokens=32, attention_streams=True)
    runner = llm.model_runner
    assert runner.side_stream is None                    # the CPU has one stream: ignored
    runner.side_stream = side = object()                 # as on a GPU

    def step(shape):
        return runner.packer.pack(dummy_batch(shape, runner.block_size), [SamplingParams()] * len(shape))

    small_mixed, large_mixed = step([(10, 1), (5, 5)]), step([(10, 1), (40, 40)])
    decode, prompt = step([(10, 1), (11, 1)]), step([(40, 40)])
    runner.pdl = None                                    # no programmatic dependent launch here
    assert [runner.attention_stream(s) for s in (small_mixed, large_mixed, decode, prompt)] == [side, side, None, None]
    runner.pdl = object()                                # sm_90+: steps of <= 32 tokens use PDL
    assert runner.attention_stream(small_mixed) is None and runner.attention_stream(large_mixed) is side


def test_attention_streams_must_be_a_bool(tmp_path):
    model = checkpoint.write_random_checkpoint(checkpoint.tiny_config("qwen3"), tmp_path / "m",
                                               dtype="float32", seed=0)
    with pytest.raises(ValueError, match="attention_streams must be true or false"):
        EngineConfig(model=str(model), attention_streams="yes")
