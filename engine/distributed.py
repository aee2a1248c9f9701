"""Tensor parallelism across processes on one host.

Rank 0 is the engine's own process: it runs the policy and, each step, broadcasts the
packed step inputs (ModelRunner.broadcast). Ranks 1..N-1 are spawned here; each builds its
ModelRunner (its weight shard, its slice of the KV heads) and follows rank 0 until told to
stop. NCCL on CUDA (rank r on cuda:r), gloo on the CPU.

The rendezvous never listens on a network port: the ranks meet through a file in a private
temporary folder (torch's TCP store would listen on every interface), and gloo's and NCCL's
own sockets use the loopback interface unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say
otherwise (all ranks are on this host).

A failing worker sends its traceback up a pipe and exits; rank 0's next collective then
fails (or, for NCCL, times out) and `Workers.check` re-raises the worker's error there.
A worker that seems stuck prints its Python stack on SIGUSR1 (`kill -USR1 PID`).
"""
import faulthandler
import os
import shutil
import signal
import socket
import tempfile
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


def rendezvous_file() -> str:
    """A fresh rendezvous for one process group: a file path in a new private folder."""
    return os.path.join(tempfile.mkdtemp(prefix="twinserve-tp-"), "rendezvous")


def loopback_interface() -> str | None:
    return next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
        return torch.device("cuda", rank)
    return torch.device("cpu")


def init_process_group(rank: int, world_size: int, rendezvous: str | int,
                       device: torch.device) -> None:
    """Join the group. `rendezvous`: a `rendezvous_file()` path (what the engine uses), or
    a TCP port on 127.0.0.1 (torch's store then listens on every interface)."""
    loopback = loopback_interface()
    if loopback is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", loopback)
    init = (f"tcp://127.0.0.1:{rendezvous}" if isinstance(rendezvous, int)
            else f"file://{rendezvous}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init,
                            rank=rank, world_size=world_size, timeout=TIMEOUT)


def worker_main(rank: int, config: EngineConfig, model_config: ModelConfig, rendezvous: str,
                errors) -> None:
    """Entry point of a spawned rank > 0."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        device = rank_device(config, rank)
        init_process_group(rank, config.tensor_parallel_size, rendezvous, device)
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
        self.rendezvous = rendezvous = rendezvous_file()
        self.processes, self.errors = [], []
        for rank in range(1, config.tensor_parallel_size):
            receiver, sender = ctx.Pipe(duplex=False)
            process = ctx.Process(target=worker_main, daemon=True, name=f"twinserve-tp{rank}",
                                  args=(rank, config, model_config, rendezvous, sender))
            process.start()
            sender.close()
            self.processes.append(process)
            self.errors.append(receiver)
        init_process_group(0, config.tensor_parallel_size, rendezvous, device)

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
        shutil.rmtree(os.path.dirname(self.rendezvous), ignore_errors=True)
