"""Tensor parallelism on GPUs: TP=N greedy tokens against TP=1, and failed workers (run on a
multi-GPU machine).

    python benchmarks/check_tp.py --tp 2 [--stages allreduce,tokens,faults]

allreduce  a bare collective: N spawned processes all-reduce one tensor (NCCL on CUDA),
           timed, so a transport problem shows up apart from the engine.
tokens     fp32 tiny random Qwen3 and Llama (std 0.3: every token depends on the whole
           context) at TP=1 and TP=N, CUDA graphs on (decode and mixed, with padding rows):
           the tokens must be equal (NCCL sums in another order, ~1e-7 relative, far below
           these models' top-2 logit gaps). Every rank runs the start-up (profile, warm-up,
           graph capture), so this is also where a rank > 0 start-up bug shows.
faults     TWINSERVE_TP_FAULT makes rank 1 fail (join: before it joins the group; build:
           before it builds its model, while rank 0 builds and profiles its own; step:3: at
           the third step it follows, rank 0 waiting on NCCL), each in a fresh process: rank
           0 must fail with the worker's error within --fault-bound seconds (not the
           10-minute collective timeout), either raised ("raised": the NCCL abort ended its
           wait) or printed before exiting ("exited": the watchdog's fallback).

Prints a table and one line of JSON; exits non-zero on a mismatch or a failed fault check.
If the tokens stage stalls past --timeout seconds, every process prints its Python stack
(SIGUSR1, see engine.distributed) and the script exits non-zero. For a device-side assert,
`CUDA_LAUNCH_BLOCKING=1` makes the worker's traceback (which rank 0 now raises) point at the
failing op.
"""
import argparse
import faulthandler
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.distributed import FAULT_ENV, free_port, init_process_group  # noqa: E402
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


def watchdog(timeout: float) -> threading.Timer:
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
    return timer


def tiny_checkpoint(root: str, arch: str) -> str:
    return str(write_random_checkpoint(tiny_config(arch, num_attention_heads=8, num_key_value_heads=4),
                                       os.path.join(root, arch), dtype="float32", std=0.3))


def tokens_stage(tp: int, timeout: float) -> list[dict]:
    timer = watchdog(timeout)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (3, 17, 41, 90, 200)]
    greedy = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for arch in ("qwen3", "llama"):
            path = tiny_checkpoint(root, arch)
            outs = {}
            for size in (1, tp):
                with LLM(path, dtype="float32", tensor_parallel_size=size, num_gpu_blocks=512,
                         max_model_len=512, max_num_seqs=8) as llm:
                    outs[size] = [o.token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
            equal = sum(a == b for a, b in zip(outs[1], outs[tp]))
            rows.append({"stage": "tokens", "arch": arch, "tp": tp,
                         "equal_to_tp1": f"{equal}/{len(prompts)}", "pass": equal == len(prompts)})
            print(rows[-1], flush=True)
    timer.cancel()
    return rows


def fault_case(tp: int) -> None:
    """Child mode (--fault-case): start a TP engine with TWINSERVE_TP_FAULT set by the parent
    and generate; print one JSON line: what raised and how long the failing call took."""
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with tempfile.TemporaryDirectory() as root:
        path = tiny_checkpoint(root, "llama")
        start, call = time.perf_counter(), "start"
        try:
            llm = LLM(path, dtype="float32", tensor_parallel_size=tp, num_gpu_blocks=512,   # the
                      max_model_len=512, max_num_seqs=8, max_num_batched_tokens=512)   # tokens stage's kernels
            start, call = time.perf_counter(), "generate"
            llm.generate([[5, 6, 7, 8]] * 4, greedy, use_tqdm=False)
            print(json.dumps({"raised": None}), flush=True)
        except Exception as e:
            print(json.dumps({"raised": type(e).__name__, "in": call,
                              "seconds": round(time.perf_counter() - start, 2),
                              "worker_traceback": "injected fault" in str(e)}), flush=True)
            os._exit(0)    # skip the interpreter's teardown of a failed group


def faults_stage(tp: int, bound: float) -> list[dict]:
    rows = []
    for fault in ("join", "build", "step:3"):
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--tp", str(tp), "--fault-case"],
                                  env={**os.environ, FAULT_ENV: fault}, capture_output=True, text=True,
                                  timeout=bound + 120)
            out, err, rc = done.stdout, done.stderr, done.returncode
        except subprocess.TimeoutExpired as e:
            out, err, rc = e.stdout or "", e.stderr or "", None
        wall = time.perf_counter() - start
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        child = json.loads(lines[-1]) if lines else {}
        if child.get("raised"):
            how, ok = "raised", child["worker_traceback"] and child["seconds"] < bound
        elif rc == 1 and "rank 0 is still blocked in the engine" in (err or ""):
            how, ok = "exited", "injected fault" in err
        else:
            how, ok = ("hung" if rc is None else f"rc={rc}"), False
        rows.append({"stage": "faults", "fault": fault, "tp": tp, "how": how,
                     "error_after_s": child.get("seconds"), "wall_s": round(wall, 1), "pass": bool(ok)})
        print(rows[-1], flush=True)
        if not ok:
            print((err or "")[-3000:], file=sys.stderr, flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--stages", default="allreduce,tokens,faults")
    ap.add_argument("--timeout", type=float, default=150, help="tokens stage: stack dump + exit past this")
    ap.add_argument("--fault-bound", type=float, default=60, help="faults stage: seconds to the error")
    ap.add_argument("--fault-case", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fault_case:
        return fault_case(args.tp)
    stages = args.stages.split(",")
    unknown = set(stages) - {"allreduce", "tokens", "faults"}
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}: choose from allreduce, tokens, faults")
    result = {"bench": "check_tp", "tp": args.tp}
    if "allreduce" in stages:
        result["bare_allreduce"] = bare = bare_allreduce(args.tp, 60)
        print({"bare_allreduce": bare}, flush=True)
        if not bare["pass"]:
            print(json.dumps({**result, "pass": False}))
            sys.exit(1)
    rows = []
    if "tokens" in stages:
        rows += tokens_stage(args.tp, args.timeout)
    if "faults" in stages:
        rows += faults_stage(args.tp, args.fault_bound)
    for row in rows:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    ok = all(row["pass"] for row in rows)
    print(json.dumps({**result, "pass": ok, "rows": rows}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
