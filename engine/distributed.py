"""Tensor parallelism across processes on one host.

Rank 0 is the engine's own process: it runs the policy and, each step, broadcasts the
packed step inputs (ModelRunner.broadcast). Ranks 1..N-1 are spawned here; each builds its
ModelRunner (its weight shard, its slice of the KV heads) and follows rank 0 until told to
stop. NCCL on CUDA (rank r on cuda:r), gloo on the CPU.

A failing worker sends its traceback up a pipe and exits; rank 0's next collective then
fails (or, for NCCL, times out) and `Workers.check` re-raises the worker's error there.
A worker that seems stuck prints its Python stack on SIGUSR1 (`kill -USR1 PID`).
"""
import faulthandler
import signal
import socket
import threading
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.model_runner import ModelRunner
from engine.models import ModelConfig

TIMEOUT = timedelta(minutes=10)   # a collective waiting longer than this fails


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def init_process_group(rank: int, world_size: int, port: int, device: torch.device) -> None:
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=TIMEOUT)


def worker_main(rank: int, config: EngineConfig, model_config: ModelConfig, port: int,
                errors) -> None:
    """Entry point of a spawned rank > 0."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        device = rank_device(config, rank)
        init_process_group(rank, config.tensor_parallel_size, port, device)
        ModelRunner(config, model_config, rank, device).follow()
    except BaseException:
        errors.send(f"tensor-parallel worker rank {rank} failed:\n{traceback.format_exc()}")
        raise SystemExit(1)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class Workers:
    """The spawned ranks 1..N-1. Building it also joins rank 0 to the process group."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device):
        ctx = mp.get_context("spawn")
        port = free_port()
        self.processes, self.errors = [], []
        for rank in range(1, config.tensor_parallel_size):
            receiver, sender = ctx.Pipe(duplex=False)
            process = ctx.Process(target=worker_main, daemon=True, name=f"twinserve-tp{rank}",
                                  args=(rank, config, model_config, port, sender))
            process.start()
            sender.close()
            self.processes.append(process)
            self.errors.append(receiver)
        init_process_group(0, config.tensor_parallel_size, port, device)

    def check(self, wait_s: float = 0.0) -> None:
        """Raise the first worker error reported (waiting up to `wait_s` for one), or a
        plain error if a worker died without one."""
        for receiver in self.errors:
            try:
                if receiver.poll(wait_s):
                    message = receiver.recv()
                    raise RuntimeError(message)
            except (EOFError, OSError):    # died without a word: see its exit code
                pass
        for process in self.processes:
            process.join(timeout=wait_s)
            if process.exitcode not in (None, 0):
                raise RuntimeError(f"tensor-parallel worker {process.name} exited with "
                                   f"code {process.exitcode}")

    def close(self, stop=None) -> None:
        """`stop()` tells the followers to return (rank 0's STOP broadcast); then join,
        and terminate whatever did not exit. Never hangs: after a failure mid-step the
        followers may sit in another collective, so `stop` gets a thread and a deadline,
        and without `stop` (rank 0 failed) they are terminated at once."""
        wait_s = 0.0
        if stop is not None and all(p.is_alive() for p in self.processes):
            stopper = threading.Thread(target=stop, daemon=True)
            stopper.start()
            stopper.join(timeout=10)
            wait_s = 10.0
        for process in self.processes:
            process.join(timeout=wait_s)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        if dist.is_initialized():   # NCCL's teardown can block on a dead peer: give it a deadline
            closer = threading.Thread(target=dist.destroy_process_group, daemon=True)
            closer.start()
            closer.join(timeout=10)
