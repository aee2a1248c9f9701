"""The profile's KV pool as serving has it: blocks written by the model's own prefills
(calibrate.kv_cache_init=written), only those the profiled shapes read."""
import pytest

torch = pytest.importorskip("torch")
checkpoint = pytest.importorskip("engine.checkpoint")

from engine import LLM, SamplingParams  # noqa: E402
from experiments.calibrate import pool_blocks_read, write_kv_pool  # noqa: E402


def test_pool_blocks_read_covers_the_largest_contiguous_shape():
    grid = [{"shape": [(10, 1), (7, 1)]}, {"shape": [(33, 33)]}, {"shape": [(4, 4, 4, 0)]}]
    # block size 4: 3 + 2 blocks, 9 blocks, 1 block -> blocks 1..9 (and block 0, never read)
    assert pool_blocks_read(grid, 4, 100, contiguous=True) == 10
    assert pool_blocks_read(grid, 4, 6, contiguous=True) == 6          # wraps: the whole pool
    assert pool_blocks_read(grid, 4, 100, contiguous=False) == 100     # scattered: anywhere


def test_write_kv_pool_writes_the_blocks_asked_and_no_other(tmp_path):
    model = checkpoint.write_random_checkpoint(checkpoint.tiny_config("qwen3"), tmp_path / "m",
                                               dtype="float32", seed=0)
    llm = LLM(str(model), device="cpu", dtype="float32", attention_backend="torch",
              num_gpu_blocks=32, block_size=4, max_model_len=64)
    runner = llm.model_runner
    # 11 blocks asked, 16-token prompts (4 blocks each): blocks 1-4, 5-8, 9-10
    written = write_kv_pool(runner, 11, 16, llm.model_config.vocab_size, SamplingParams())
    assert written == 10 * 4
    per_block = runner.kv_cache.abs().amax(dim=(0, 1, 3, 4, 5))      # [blocks]
    assert (per_block[1:11] > 0).all()
    assert per_block[0] == 0 and (per_block[11:] == 0).all()
    # the policy never saw those writes: the engine serves from the pool as a fresh one does
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [3, 4, 5]]
    fresh = LLM(str(model), device="cpu", dtype="float32", attention_backend="torch",
                num_gpu_blocks=32, block_size=4, max_model_len=64)
    assert ([o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            == [o.token_ids for o in fresh.generate(prompts, greedy, use_tqdm=False)])
