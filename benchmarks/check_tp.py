"""Tensor parallelism on GPUs: TP=N greedy tokens against TP=1 (run on a multi-GPU machine).

    python benchmarks/check_tp.py --tp 2

fp32 tiny random Qwen3 and Llama (std 0.3: every token depends on the whole context): the
tokens must be equal (NCCL sums in another order, ~1e-7 relative, far below these models'
top-2 logit gaps). Prints a table and one line of JSON; exits non-zero on a mismatch.

First, a bare collective: N spawned processes all-reduce one tensor (NCCL on CUDA), timed,
so a transport problem shows up apart from the engine. If anything stalls past --timeout
seconds, every process prints its Python stack (SIGUSR1, see engine.distributed) and the
script exits non-zero.
"""
import faulthandler
import signal
import threading
import time
import argparse
import json
import os
import random
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.distributed import free_port, init_process_group  # noqa: E402
from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402


def allreduce_rank(rank: int, world: int, port: int, results) -> None:
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    start = time.perf_counter()
    init_process_group(rank, world, port, device)   # the engine's own: NCCL on CUDA, else gloo
    x = torch.full((1 << 20,), float(rank + 1), device=device)
    dist.all_reduce(x)
    total = float(x[0])
    elapsed = time.perf_counter() - start
    dist.destroy_process_group()
    if rank == 0:
        results.put({"sum": total, "expected": world * (world + 1) / 2, "init_and_first_s": elapsed})


def bare_allreduce(world: int, timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    results, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=allreduce_rank, args=(r, world, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    if any(p.is_alive() for p in procs):
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGUSR1)
        time.sleep(2)
        for p in procs:
            p.terminate()
        return {"pass": False, "error": f"all_reduce did not finish in {timeout} s"}
    row = results.get(timeout=5)
    row["pass"] = row["sum"] == row["expected"]
    return row


def watchdog(timeout: float) -> None:
    """After `timeout` s: every process (ours and the TP workers) prints its stack, then exit."""
    def fire():
        for child in mp.active_children():
            os.kill(child.pid, signal.SIGUSR1)
        faulthandler.dump_traceback(all_threads=True)
        time.sleep(3)
        os._exit(3)
    timer = threading.Timer(timeout, fire)
    timer.daemon = True
    timer.start()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=150)
    args = ap.parse_args()
    bare = bare_allreduce(args.tp, 60)
    print({"bare_allreduce": bare}, flush=True)
    if not bare["pass"]:
        print(json.dumps({"bench": "check_tp", "pass": False, "bare_allreduce": bare}))
        sys.exit(1)
    watchdog(args.timeout)
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
                         max_model_len=512, max_num_seqs=8) as llm:
                    outs[tp] = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            equal = sum(a == b for a, b in zip(outs[1], outs[args.tp]))
            ok &= equal == len(prompts)
            rows.append({"arch": arch, "tp": args.tp, "equal_to_tp1": f"{equal}/{len(prompts)}",
                         "pass": equal == len(prompts)})
            print(rows[-1], flush=True)
    print(json.dumps({"bench": "check_tp", "pass": ok, "bare_allreduce": bare, "rows": rows}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
