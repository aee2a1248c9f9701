"""The decode attention's split-KV rule pinned by a kernel plan (engine.kernel_plan "decode"):
an engine given a calibration runs the rule that calibration's engine profiled (its
`decode_plan`), so the twin prices the shares the kernel cuts; without one it runs its own
(policy.decode_plan's constants). Either way the greedy tokens are the same. A rule the
kernel cannot run is refused in one line. CPU: the Triton kernels interpreted."""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU-interpreter tests (tensors on the CPU)")

from engine import LLM, SamplingParams, kernel_plan  # noqa: E402
from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402
from experiments.replay import split_rule_line  # noqa: E402
from policy.decode_plan import KERNEL_RULE_FIELDS, MIN_TOKENS_PER_SPLIT, DecodePlan  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
ENGINE = dict(device="cpu", dtype="float32", attention_backend="triton", num_gpu_blocks=64,
              max_model_len=320, max_num_seqs=2, max_num_batched_tokens=320, enforce_eager=True)
CONTEXT = 3 * MIN_TOKENS_PER_SPLIT + 8   # split by the engine's rule, one share at 4x its shortest


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_random_checkpoint(tiny_config("qwen3"), tmp_path_factory.mktemp("rule") / "qwen3",
                                       dtype="float32", std=0.3, progress=False))


def calibration(tmp_path, **rule):
    """A calibration as experiments.calibrate writes one, reduced to what the engine reads."""
    plan = {**DecodePlan(1, 1).describe(), **rule}
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"format": "twinserve-calibration/2", "model": "tiny",
                                "kernel_plan": {"format": kernel_plan.FORMAT, "device": "cpu", "skinny": {}},
                                "decode_plan": plan}))
    return str(path)


def test_a_pinned_rule_cuts_the_shares_its_calibration_priced(checkpoint, tmp_path):
    prompt = [1 + i % 89 for i in range(CONTEXT)]
    own = LLM(checkpoint, **ENGINE)
    own_plan = own.decode_plan()
    assert own_plan.min_tokens_per_split == MIN_TOKENS_PER_SPLIT
    assert own_plan.shares([CONTEXT])[3][0] > 1                  # the engine's rule splits it
    tokens = own.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids
    assert split_rule_line(own.decode_plan(), own.config.kernel_plan) == f"decode split rule: the engine's own (shortest share {MIN_TOKENS_PER_SPLIT} tokens)"
    own.close()

    longer = 4 * MIN_TOKENS_PER_SPLIT
    pinned = LLM(checkpoint, **ENGINE, kernel_plan=calibration(tmp_path, min_tokens_per_split=longer))
    plan = pinned.decode_plan()
    assert plan.min_tokens_per_split == longer and plan.num_kv_heads == own_plan.num_kv_heads
    assert plan.shares([CONTEXT])[3][0] == 1                     # the calibration's rule: one share
    assert pinned.model_runner.packer.decode_plan == plan        # what the packer cuts with
    # what a replay logs and a calibration prints: the rule, where it comes from
    assert split_rule_line(plan, pinned.config.kernel_plan).endswith(f"min_tokens_per_split {longer} (own {MIN_TOKENS_PER_SPLIT})")
    assert "pinned by " + str(tmp_path) in split_rule_line(plan, pinned.config.kernel_plan)
    assert pinned.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids == tokens
    pinned.close()


def test_a_plan_file_records_and_pins_the_rule(tmp_path):
    rule = DecodePlan(8, 132, min_tokens_per_split=256, programs_per_sm=2)
    plan = {"format": kernel_plan.FORMAT, "device": "cpu", "skinny": {}, "decode": rule.kernel_rule()}
    path = tmp_path / "plan.json"
    kernel_plan.write(str(path), plan)
    assert kernel_plan.read_decode_rule(str(path)) == rule.kernel_rule()
    assert set(rule.kernel_rule()) == set(KERNEL_RULE_FIELDS)
    assert kernel_plan.describe(plan)["decode"].startswith("block_n=64 programs_per_sm=2 min_tokens_per_split=256")
    del plan["decode"]
    kernel_plan.write(str(path), plan)
    assert kernel_plan.read_decode_rule(str(path)) is None      # no rule: the engine's own
    assert kernel_plan.read_decode_rule(str(tmp_path / "none.json")) is None


@pytest.mark.parametrize("rule, words", [
    ({"block_n": 32}, "the kernel runs tiles of 64 tokens"),
    ({"max_splits": 4096}, "at most 64 shares a sequence"),
    ({"min_tokens_per_split": 0}, "min_tokens_per_split must be an integer >= 1"),
])
def test_a_rule_the_kernel_cannot_run_is_refused(checkpoint, tmp_path, rule, words):
    with pytest.raises(ValueError, match=words):
        LLM(checkpoint, **ENGINE, kernel_plan=calibration(tmp_path, **rule))


def test_a_rule_with_unknown_or_missing_fields_is_refused(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": kernel_plan.FORMAT, "device": "cpu", "skinny": {},
                                "decode": {"block_n": 64, "shortest": 3}}))
    with pytest.raises(ValueError, match=r"unknown fields \['shortest'\] / lacks \['programs_per_sm'"):
        kernel_plan.read_decode_rule(str(path))
