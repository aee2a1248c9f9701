"""Tensor parallelism on GPUs: TP=N greedy tokens against TP=1 (run on a multi-GPU machine).

    python benchmarks/check_tp.py --tp 2

fp32 tiny random Qwen3 and Llama (std 0.3: every token depends on the whole context): the
tokens must be equal (NCCL sums in another order, ~1e-7 relative, far below these models'
top-2 logit gaps). Prints a table and one line of JSON; exits non-zero on a mismatch.
"""
import argparse
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    args = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (3, 17, 41, 90, 200)]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    rows, ok = [], True
    with tempfile.TemporaryDirectory() as root:
        for arch in ("qwen3", "llama"):
            path = str(write_random_checkpoint(tiny_config(arch, num_attention_heads=8, num_key_value_heads=4),
                                               os.path.join(root, arch), dtype="float32", std=0.3))
            outs = {}
            for tp in (1, args.tp):
                with LLM(path, dtype="float32", tensor_parallel_size=tp, num_gpu_blocks=512,
                         max_model_len=512, max_num_seqs=8, compile=False) as llm:
                    outs[tp] = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            equal = sum(a == b for a, b in zip(outs[1], outs[args.tp]))
            ok &= equal == len(prompts)
            rows.append({"arch": arch, "tp": args.tp, "equal_to_tp1": f"{equal}/{len(prompts)}",
                         "pass": equal == len(prompts)})
            print(rows[-1])
    print(json.dumps({"bench": "check_tp", "pass": ok, "rows": rows}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
