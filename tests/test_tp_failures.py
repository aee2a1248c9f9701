"""Tensor parallelism when something goes wrong (TP=2, gloo on the CPU).

- A failing worker never leaves rank 0 waiting for the collective timeout (10 minutes): rank 0
  raises the worker's own error, traceback included, at start-up (before and after the
  worker joins the process group) and mid-run; and where rank 0 stays blocked anyway (a
  device sync that nothing ends), it prints that error and exits. The failures are injected
  with TWINSERVE_TP_FAULT (engine.distributed.parse_fault).
- Every rank runs the CUDA start-up (warm-up steps, then each graph's body, largest first) on
  the same inputs: a rank > 0 packs its own graph steps, and their padding rows once held
  earlier steps' bytes (the index_select out of range that asserted on rank 1 of a
  Llama-3.1-8B TP=2 start on two H200s).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported anywhere

import subprocess
import sys
import tempfile
import threading
import time
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from engine import LLM, EngineConfig, SamplingParams
from engine.checkpoint import tiny_config, write_random_checkpoint
from engine.distributed import FAULT_ENV, init_process_group
from engine.kernels.launch import decode_work_capacity
from policy.decode_plan import DecodePlan
from engine.model_runner import ModelRunner
from engine.models import ModelConfig
from engine.step_inputs import (DECODE_GRAPH, FIELDS, LOGITS_ROWS, MIXED_GRAPH, StepBuffer,
                                StepPacker, dummy_batch)
from policy.cuda_graphs import decode_sizes, mixed_sizes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = dict(device="cpu", dtype="float32", attention_backend="torch", num_gpu_blocks=64,
           max_model_len=64, tensor_parallel_size=2)
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
BOUND_S = 60    # "within seconds": far below the 10-minute collective timeout


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return str(write_random_checkpoint(tiny_config("llama"), tmp_path_factory.mktemp("ckpt") / "m",
                                       dtype="float32", seed=0, std=0.3))


def error_within(seconds: float, fn) -> BaseException:
    """The exception `fn` raises, which it must raise within `seconds` (run in a thread, so
    a hang fails the test instead of blocking the suite)."""
    out = []

    def run():
        try:
            fn()
            out.append(None)
        except BaseException as e:
            out.append(e)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert out, f"still blocked after {seconds} s"
    assert out[0] is not None, "returned instead of raising"
    return out[0]


# ---- a failing worker ---------------------------------------------------------------------

@pytest.mark.distributed
@pytest.mark.parametrize("where", ["join", "build"])
def test_worker_failing_at_start_fails_the_engine_start(llama, monkeypatch, where):
    """Rank 1 raises before it joins the process group (rank 0 would wait in the
    rendezvous for the timeout) or right after (rank 0 is building its own runner)."""
    monkeypatch.setenv(FAULT_ENV, where)
    error = error_within(BOUND_S, lambda: LLM(llama, **CPU))
    assert isinstance(error, RuntimeError)
    assert "tensor-parallel worker rank 1 failed" in str(error)
    assert f"injected fault ({FAULT_ENV}={where})" in str(error)
    assert "Traceback" in str(error)        # the worker's own, not rank 0's collective error


@pytest.mark.distributed
def test_worker_failing_mid_run_raises_its_error(llama, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "step:3")
    llm = LLM(llama, **CPU)
    worker = llm.workers.processes[0]
    try:
        error = error_within(BOUND_S, lambda: llm.generate([[5, 6, 7, 8]] * 2, GREEDY, use_tqdm=False))
    finally:
        llm.close()
    assert isinstance(error, RuntimeError)
    assert f"injected fault ({FAULT_ENV}=step:3)" in str(error)
    assert "tensor-parallel worker rank 1 failed" in str(error)
    assert not worker.is_alive()


@pytest.mark.distributed
def test_an_engine_starts_after_a_failed_group_start_in_the_same_process(llama, monkeypatch):
    """A process group start that fails once torch has named the group (as when a worker dies
    while rank 0 connects to it: "Connection closed by peer") fails the engine's start at once
    and leaves the next tensor-parallel engine of this process able to meet its workers,
    instead of waiting in the rendezvous for the 10-minute timeout."""
    import torch.distributed.distributed_c10d as c10d
    real_helper = c10d._new_process_group_helper

    def connect_fails(*args, **kwargs):    # after torch has named the group, as gloo's connect fails
        raise RuntimeError("Gloo connectFullMesh failed: Connection closed by peer (injected)")
    monkeypatch.setattr(c10d, "_new_process_group_helper", connect_fails)
    error = error_within(BOUND_S, lambda: LLM(llama, **CPU))
    assert "(injected)" in str(error)
    monkeypatch.setattr(c10d, "_new_process_group_helper", real_helper)
    started = []
    thread = threading.Thread(target=lambda: started.append(LLM(llama, **CPU)), daemon=True)
    thread.start()
    thread.join(BOUND_S)
    assert started, f"the next engine did not start within {BOUND_S} s"
    llm = started[0]
    try:
        out = llm.generate([[5, 6, 7, 8]], GREEDY, use_tqdm=False)
    finally:
        llm.close()
    assert len(out[0].token_ids) == GREEDY.max_tokens


STUCK_RANK0 = """
import os, sys, time
os.environ["TRITON_INTERPRET"] = "1"
os.environ[{fault_env!r}] = "step:1"
import engine.distributed
from engine import LLM, SamplingParams
from engine.model_runner import ModelRunner
engine.distributed.GRACE_S = 1.0
# rank 0 blocked for good inside its step, as in a device sync that nothing ends (this
# process only: the worker is a fresh interpreter)
ModelRunner.run_body = lambda *args, **kwargs: time.sleep(600)
llm = LLM({path!r}, **{cpu!r})
llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2))
print("returned")
"""


@pytest.mark.distributed
def test_rank0_still_blocked_after_a_worker_failure_exits_with_its_error(llama):
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", STUCK_RANK0.format(fault_env=FAULT_ENV, path=llama, cpu=CPU)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "returned" not in done.stdout
    assert f"injected fault ({FAULT_ENV}=step:1)" in done.stderr
    assert "rank 0 is still blocked in the engine" in done.stderr
    assert time.perf_counter() - start < 4 * BOUND_S


NEVER_JOINS = """
import time
import engine.distributed
def join_never(self, world_size, device):   # the worker waits in the rendezvous, where no
    self.arrived.wait()                       # socket closes when rank 0 dies
    time.sleep(1)
    print(self.processes[0].pid, flush=True)
    time.sleep(600)
engine.distributed.Workers.join = join_never
from engine import LLM
LLM({path!r}, **{cpu!r})
"""


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"    # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.distributed
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads process states from /proc")
def test_workers_exit_when_rank0_is_killed(llama):
    """Rank 0 killed (no atexit, no close) while its worker waits for it: the worker must not
    stay behind until the timeout (NCCL: spinning in a collective, holding its GPU)."""
    rank0 = subprocess.Popen([sys.executable, "-c", NEVER_JOINS.format(path=llama, cpu=CPU)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        worker = int(rank0.stdout.readline())
        assert alive(worker)
    finally:
        rank0.kill()
        rank0.wait()
    deadline = time.perf_counter() + BOUND_S
    while alive(worker) and time.perf_counter() < deadline:
        time.sleep(0.1)
    assert not alive(worker)


def test_bad_fault_setting_is_refused_in_one_line(llama, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "step:0")
    with pytest.raises(ValueError, match=f"{FAULT_ENV} must be join, build or step:N"):
        LLM(llama, **CPU)


# ---- the start-up on every rank ---------------------------------------------------------

def packer(rank: int, max_seqs=8, max_tokens=64, block_size=4, max_model_len=32, tile=16):
    """A rank's StepPacker over a buffer full of junk (what earlier steps leave there)."""
    max_blocks = -(-max_model_len // block_size)
    buffer = StepBuffer(max_tokens, max_seqs, max_blocks, -(-max_tokens // tile) + max_seqs,
                        decode_work_capacity(max_seqs, DecodePlan(2, 4)), torch.device("cpu"))
    buffer.host_np[:] = np.random.default_rng(rank).integers(0, 256, buffer.host_np.size, dtype=np.uint8)
    return StepPacker(buffer, block_size, max_blocks, max_seqs, 1000, tile, DecodePlan(2, 4), rank=rank)


def read_by_device(fields: list[np.ndarray], block_size=4) -> list[np.ndarray]:
    """The parts of a step's fields up to the logits rows that its kernels read: the block
    table entries up to each context length, and a split-KV work item's columns past the
    first only where that first (the sequence) is not -1 (an unused item)."""
    fields = list(fields[:LOGITS_ROWS + 1])
    context_lens, tables, work = fields[3], fields[5], fields[7]
    fields[5] = [row[:-(-int(n) // block_size)] for row, n in zip(tables, context_lens)]
    fields[7] = [item if item[0] >= 0 else item[:1] for item in work]
    return [np.concatenate(f) if isinstance(f, list) and f else f for f in fields]


def test_graph_steps_pack_the_same_device_inputs_on_every_rank():
    """At capture every rank packs each graph's dummy step itself: everything the model
    reads (all but the sampling parameters, rank 0's alone) must be the same bytes on
    every rank, the padding rows included, whatever the buffer held before."""
    ranks = [packer(0), packer(1)]
    L, max_seqs = 32, 8
    keys = [(DECODE_GRAPH, s) for s in decode_sizes(max_seqs, 64)]
    keys += [(MIXED_GRAPH, s) for s in mixed_sizes(64, 64)]
    for kind, size in keys:
        if kind == DECODE_GRAPH:
            shape = [(1, 1)] * size
        else:   # ModelRunner.graph_step's prompts
            total = min(size, min(size, max_seqs) * L)
            shape = [(min(L, total - i), min(L, total - i)) for i in range(0, total, L)]
        packed = []
        for p in ranks:
            step = p.pack(dummy_batch(shape, 4), None, graph=(kind, size))
            packed.append((step, p.buffer.views(step.T, step.B, step.W, step.P, step.D, step.S)[1]))
        (step, fields0), (_, fields1) = packed
        assert step.S > len(step.sampled) or kind == DECODE_GRAPH   # padding rows to check
        for name, a, b in zip(FIELDS, read_by_device(fields0), read_by_device(fields1)):
            np.testing.assert_array_equal(a, b, err_msg=f"graph {kind, size}, {name[0]}")
        rows = fields1[LOGITS_ROWS]
        assert ((rows >= 0) & (rows < step.T)).all()


def start_up_rank(rank: int, path: str, rendezvous: str, results) -> None:
    """One rank of the CUDA start-up, run on the CPU: warm-up steps (rank 0 broadcasts them,
    rank 1 receives), then every graph's body in capture order, eagerly."""
    try:
        torch.set_num_threads(1)
        model_config = ModelConfig.from_pretrained(path)
        config = EngineConfig(model=path, **{**CPU, "max_model_len": 32}, max_num_seqs=8,
                              max_num_batched_tokens=64).for_model(model_config)
        init_process_group(rank, 2, rendezvous, torch.device("cpu"))
        runner = ModelRunner(config, model_config, rank, torch.device("cpu"))
        runner.warm_up()
        with torch.inference_mode():
            for kind, size in runner.graph_keys():
                runner.graph_body(kind, size)[1]()
        results.put((rank, "ok"))
    except BaseException:
        results.put((rank, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()   # the message leaves before the process does
        os._exit(0)


@pytest.mark.distributed
def test_every_rank_runs_the_graph_bodies_of_the_start_up(llama):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = os.path.join(folder, "rendezvous")
        procs = [ctx.Process(target=start_up_rank, args=(r, llama, rendezvous, results), daemon=True)
                 for r in range(2)]
        for p in procs:
            p.start()
        try:
            outcome = dict(results.get(timeout=BOUND_S * 2) for _ in procs)
        finally:
            for p in procs:
                p.kill()
    assert outcome == {0: "ok", 1: "ok"}, outcome
