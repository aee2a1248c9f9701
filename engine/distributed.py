"""Tensor parallelism across processes on one host.

Rank 0 is the engine's own process: it runs the policy and, each step, broadcasts the
packed step inputs (ModelRunner.broadcast). Ranks 1..N-1 are spawned here; each builds its
ModelRunner (its weight shard, its slice of the KV heads) and follows rank 0 until told to
stop. NCCL on CUDA (rank r on cuda:r), gloo on the CPU.

The rendezvous never listens on a network port: the ranks meet through a file in a private
temporary folder (torch's TCP store would listen on every interface), and gloo's and NCCL's
own sockets use the loopback interface unless GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME say
otherwise (all ranks are on this host).

A failing worker never leaves rank 0 waiting for the collective timeout (10 minutes). The
worker sends its traceback up a pipe and exits; a watchdog thread of rank 0 (`Workers.watch`)
waits on those pipes and on the workers' exits, and on a failure:
  1. records it: `Workers.check` raises it, with the worker's traceback, wherever rank 0
     notices (its ModelRunner at every launch and wait, the engine when a collective fails);
  2. kills the other workers (they sit in collectives that will never complete) and aborts
     rank 0's process group: NCCL's abort ends the collective kernels that wait for the
     dead peer, so a blocked stream sync returns and the next collective raises (gloo's
     collectives fail by themselves once the peer's sockets close);
  3. if after GRACE_S nobody has been told and a thread is still inside the engine (a sync
     the abort did not end), prints the worker's error on stderr and exits the process:
     an error and exit code 1 instead of a hang.
Rank 0 joins the process group only once every worker says it is about to join, so a worker
that fails before (a missing GPU, an import error) fails the engine's start at once too; one
that fails while the group forms fails it with its own error, not rank 0's connect error, and
a failed start leaves the process able to start another engine (`init_process_group`).
Each worker exits when
rank 0's process is gone. A worker that seems stuck prints its Python stack on SIGUSR1
(`kill -USR1 PID`). TWINSERVE_TP_FAULT makes rank 1 fail on purpose (`parse_fault`): the tests
and benchmarks/check_tp.py use it.
"""
import faulthandler
import itertools
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.config import EngineConfig
from engine.model_runner import ModelRunner
from engine.models import ModelConfig

TIMEOUT = timedelta(minutes=10)   # a collective waiting longer than this fails
GRACE_S = 10.0                    # after a worker failure, how long rank 0 may stay blocked
FAULT_ENV = "TWINSERVE_TP_FAULT"
JOINING = "joining"               # a worker's first message: it is about to join the group
ENGINE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


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
    # NCCL's own watchdog, on an error it sees first: abort the communicators and let the
    # next collective raise (2), not kill the process without a word (torch's default, 3)
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    init = (f"tcp://127.0.0.1:{rendezvous}" if isinstance(rendezvous, int)
            else f"file://{rendezvous}")
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init,
                                rank=rank, world_size=world_size, timeout=TIMEOUT)
    except BaseException:
        # torch names an unnamed group by a counter it advances before it connects and resets
        # only when a formed group is destroyed: after a failed start the next group of this
        # process would be "1" where fresh workers name theirs "0", and the two would wait for
        # each other in the rendezvous until TIMEOUT
        dist.distributed_c10d._world.group_count = 0
        raise


def abort_process_group() -> None:
    """Abort this process's default group, if any, from any thread. NCCL: ncclCommAbort,
    which ends the collective kernels waiting for a dead peer (a stream sync blocked on them
    returns) and makes every later collective raise. gloo: nothing to abort (a no-op); its
    collectives fail by themselves once the peer's sockets close."""
    try:
        group = dist.distributed_c10d._get_default_group()
    except (RuntimeError, ValueError):   # not initialized, or already destroyed
        return
    try:
        group.abort()
    except AttributeError:   # a torch whose ProcessGroup lacks abort(): its NCCL backend has it
        group._get_backend(torch.device("cuda")).abort()


def destroy_process_group() -> None:
    """Leave the group, whatever state a failure left it in (an aborted NCCL group may
    refuse an orderly shutdown: it is gone either way)."""
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def parse_fault(value: str | None) -> tuple[str, int] | None:
    """TWINSERVE_TP_FAULT, to test the failure path: rank 1 raises RuntimeError("injected
    fault ...") at `join` (before it joins the process group), `build` (joined, before its
    ModelRunner exists) or `step:N` (at the N-th step it follows after start-up, N >= 1).
    Unset or empty: no fault. Returns (where, N)."""
    if not value:
        return None
    where, _, n = value.partition(":")
    if where in ("join", "build") and not n:
        return where, 0
    if where == "step" and n.isdigit() and int(n) >= 1:
        return where, int(n)
    raise ValueError(f"{FAULT_ENV} must be join, build or step:N (N >= 1), got {value!r}")


def fail_at(fault: tuple[str, int] | None, where: str) -> None:
    if fault is not None and fault[0] == where:
        raise RuntimeError(f"injected fault ({FAULT_ENV}={where})")


def fail_at_step(runner: ModelRunner, n: int) -> None:
    """Make `runner.forward` raise at its n-th call from now (TWINSERVE_TP_FAULT=step:n:
    installed once the runner is built, so start-up steps do not count)."""
    forward, calls = runner.forward, itertools.count(1)

    def forward_or_fail(step):
        if next(calls) == n:
            raise RuntimeError(f"injected fault ({FAULT_ENV}=step:{n})")
        return forward(step)
    runner.forward = forward_or_fail


def exit_with_parent() -> None:
    """A worker's thread: exit when rank 0's process is gone (killed, crashed) instead of
    waiting in a collective that will never complete, holding its GPU."""
    parent = mp.parent_process()
    if parent is not None:
        wait([parent.sentinel])
        os._exit(1)


def worker_main(rank: int, config: EngineConfig, model_config: ModelConfig, rendezvous: str,
                errors, fault: tuple[str, int] | None = None) -> None:
    """Entry point of a spawned rank > 0. On any failure: its traceback up the `errors`
    pipe, then exit at once (a failed group cannot be torn down in order: NCCL's teardown
    may block on the dead peer or on a device that asserted; the OS frees it all)."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    threading.Thread(target=exit_with_parent, daemon=True, name="twinserve-tp-parent").start()
    try:
        fail_at(fault, "join")
        device = rank_device(config, rank)
        errors.send(JOINING)
        init_process_group(rank, config.tensor_parallel_size, rendezvous, device)
        fail_at(fault, "build")
        runner = ModelRunner(config, model_config, rank, device)
        if fault is not None and fault[0] == "step":
            fail_at_step(runner, fault[1])
        runner.follow()
    except BaseException:
        message = f"tensor-parallel worker rank {rank} failed:\n{traceback.format_exc()}"
        try:
            errors.send(message)
            errors.close()
        except OSError:        # rank 0 is gone: leave the error in this process's stderr
            sys.stderr.write(message)
        sys.stderr.flush()
        os._exit(1)
    dist.destroy_process_group()   # told to stop: an orderly teardown


def blocked_in_engine() -> bool:
    """Whether a thread other than the caller is running code of the engine package (its
    stack holds a frame of a file under engine/). Asked after a worker failure: such a
    thread is rank 0, stuck in a sync that nothing will end."""
    me = threading.get_ident()
    for ident, frame in sys._current_frames().items():
        while ident != me and frame is not None:
            if frame.f_code.co_filename.startswith(ENGINE_DIR):
                return True
            frame = frame.f_back
    return False


class Workers:
    """The spawned ranks 1..N-1 and rank 0's watchdog over them. Building it also joins
    rank 0 to the process group; it raises a worker's error if one fails first."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device):
        fault = parse_fault(os.environ.get(FAULT_ENV))
        ctx = mp.get_context("spawn")
        self.rendezvous = rendezvous = rendezvous_file()
        self.processes, self.errors = [], []
        self.failure: str | None = None     # the first worker failure, with its traceback
        self.failed = threading.Event()     # set with `failure`
        self.arrived = threading.Event()    # every worker is about to join the group
        self.reported = threading.Event()   # someone was told: `check` raised it, or `close` ran
        self.closing = False                # workers exiting now are being stopped
        for rank in range(1, config.tensor_parallel_size):
            receiver, sender = ctx.Pipe(duplex=False)
            process = ctx.Process(target=worker_main, daemon=True, name=f"twinserve-tp{rank}",
                                  args=(rank, config, model_config, rendezvous, sender,
                                        fault if rank == 1 else None))
            process.start()
            sender.close()
            self.processes.append(process)
            self.errors.append(receiver)
        threading.Thread(target=self.watch, daemon=True, name="twinserve-tp-watchdog").start()
        try:
            self.join(config.tensor_parallel_size, device)
        except BaseException:
            self.close()
            raise

    def join(self, world_size: int, device: torch.device) -> None:
        """Join rank 0 to the group once every worker is about to join it, raising a
        worker's failure the moment the watchdog sees it: a worker that dies before it
        joins (a missing GPU, an import error) would leave the rendezvous waiting for
        TIMEOUT, and a rendezvous cannot be aborted (nor abandoned: a later one in this
        process would not meet its workers)."""
        while not self.arrived.wait(0.05):
            self.check()
        try:
            init_process_group(0, world_size, self.rendezvous, device)
        except Exception:
            # a worker that failed as the group formed (its sockets closed under rank 0's
            # connect): its error, with its traceback, is the cause
            self.check(wait_s=5.0)
            raise

    def watch(self) -> None:
        """The watchdog (a thread): count the workers about to join (`arrived`), and when a
        worker sends an error or exits unasked, `fail` with its message. Ends when every
        worker has exited."""
        waiting, arrived = {}, 0   # pipe or exit sentinel -> worker index
        for i, (receiver, process) in enumerate(zip(self.errors, self.processes)):
            waiting[receiver] = waiting[process.sentinel] = i
        while waiting:
            for ready in wait(list(waiting)):
                i = waiting[ready]
                receiver, process = self.errors[i], self.processes[i]
                message = None
                try:   # messages first: a failed worker sends its traceback, then exits
                    if receiver.poll():
                        message = receiver.recv()
                except (EOFError, OSError):   # the pipe closed: the exit follows
                    waiting.pop(receiver, None)
                if message == JOINING:
                    arrived += 1
                    if arrived == len(self.processes):
                        self.arrived.set()
                    continue
                if message is None and ready is receiver:
                    continue
                waiting.pop(process.sentinel, None)
                if self.closing:   # being stopped
                    continue
                if message is None:
                    message = (f"tensor-parallel worker {process.name} exited with code "
                               f"{process.exitcode} and no error message (killed? out of memory?)")
                self.fail(message)
                return

    def fail(self, message: str) -> None:
        """A worker failed: record it, kill the other workers (they wait in collectives that
        will never complete) and abort rank 0's process group, so whatever rank 0 is blocked
        in returns or raises. If after GRACE_S nobody has been told and a thread is still
        inside the engine, print the error and exit the process: a stuck sync."""
        self.failure = message
        self.failed.set()
        for process in self.processes:
            process.kill()   # a no-op for those that exited
        threading.Thread(target=abort_process_group, daemon=True, name="twinserve-tp-abort").start()
        if self.reported.wait(GRACE_S) or not blocked_in_engine():
            return
        sys.stderr.write(f"twinserve: {message}\ntwinserve: rank 0 is still blocked in the engine "
                         f"{GRACE_S:.0f} s after this (a device sync the process group's abort did "
                         "not end): exiting\n")
        sys.stderr.flush()
        shutil.rmtree(os.path.dirname(self.rendezvous), ignore_errors=True)
        os._exit(1)

    def check(self, wait_s: float = 0.0) -> None:
        """Raise the worker failure the watchdog saw (RuntimeError with the worker's
        traceback), waiting up to `wait_s` for one. Cheap (a flag test): rank 0's runner calls
        it at every launch and wait."""
        if self.failed.is_set() or (wait_s > 0 and self.failed.wait(wait_s)):
            self.reported.set()
            raise RuntimeError(self.failure)

    def close(self, stop=None) -> None:
        """`stop()` tells the followers to return (rank 0's STOP broadcast); then join,
        and terminate whatever did not exit. Never hangs: after a failure mid-step the
        followers may sit in another collective, so `stop` gets a thread and a deadline,
        and without `stop` (rank 0 failed) or after a worker failure they are terminated
        at once."""
        self.closing = True
        self.reported.set()
        wait_s = 0.0
        if stop is not None and not self.failed.is_set() and all(p.is_alive() for p in self.processes):
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
            closer = threading.Thread(target=destroy_process_group, daemon=True)
            closer.start()
            closer.join(timeout=10)
        shutil.rmtree(os.path.dirname(self.rendezvous), ignore_errors=True)
