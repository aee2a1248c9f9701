"""A backend in a process of its own, as vLLM's engine core: the server's Python (HTTP,
JSON, detokenizing thousands of stream chunks a second) never holds the interpreter lock
the backend's step loop needs, so serving over HTTP costs the engine (or the twin's
real-time pacing) no step time. The server's default for both backends.

    server process                                backend process
    BackendProcess.add / abort  -- pipe -->       backend.add / abort, between steps
    BackendProcess.step  <-- one message a step   backend.step: new tokens, finished
                                                  requests, the policy's stats

The server process checks a request before sending it (the sampling fields, and the
lengths through a probe `policy.Scheduler` of the same config), so a bad request is a 400
at once. It tokenizes and detokenizes with its own text half (`HFText`: a copy of the
tokenizer; `ByteText` for the twin).
"""
import atexit
import multiprocessing as mp
import os
import pickle
import queue
import select
import socket
import threading
import time

from policy import CacheConfig, Scheduler, Sequence
from server.backend import Backend, BackendDead, Finished, HFText, sleep_until

INLINE_SEND_BYTES = 32 << 10    # a message this small is sent from the caller's thread


def backend_main(conn, factory, args: tuple, kwargs: dict) -> None:
    """The backend process: build the backend, then step while there is work, taking
    commands between steps and sending one message per step."""
    try:
        backend = factory(*args, **kwargs)
    except BaseException as e:
        conn.send(("error", f"{e}" if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"))
        return
    sched = backend.scheduler
    bm = sched.block_manager
    conn.send(("ready", {"max_model_len": backend.max_model_len, "scheduler_config": sched.config,
                         "cache_config": CacheConfig(bm.block_size, bm.enable_prefix_caching),
                         "num_blocks": bm.num_blocks}))
    sent: dict[str, int] = {}      # unfinished request -> output tokens sent so far

    late: list[float] = []         # how late the paced steps since the last message left

    def step() -> None:
        """One step's message, built before it is due (the twin's turn ends on its clock),
        sent when it is: the pickling is off the tokens' path."""
        finished, due = backend.step_due()
        fresh = {}
        for request_id, start in sent.items():
            tokens = backend.output_tokens_since(request_id, start)
            if tokens:
                fresh[request_id] = tokens
                sent[request_id] = start + len(tokens)
        for f in finished:
            sent.pop(f.request_id, None)
        stats = backend.stats()
        if due is not None:
            stats["late_s"], late[:] = tuple(late), []
        data = pickle.dumps(("step", fresh, finished, stats), protocol=pickle.HIGHEST_PROTOCOL)
        sleep_until(due)
        conn.send_bytes(data)
        if due is not None:
            late.append(time.perf_counter() - due)
    try:
        while True:
            while conn.poll(0) or not backend.has_unfinished():
                command, *args = conn.recv()
                if command == "close":
                    return
                if command == "abort":
                    backend.abort(args[0])      # if it finished meanwhile, its output comes
                    sent.pop(args[0], None)
                    continue
                if command == "reset_prefix_cache":   # the server has no unfinished request
                    try:                              # (aborted ones are stepped out silently)
                        backend.reset_prefix_cache()
                    except Exception as e:
                        conn.send(("fatal", f"reset_prefix_cache: {type(e).__name__}: {e}"))
                        return
                    sent.clear()
                    conn.send(("step", {}, [], backend.stats()))
                    continue
                request_id, token_ids, params, arrival = args
                try:
                    backend.add(request_id, token_ids, params, arrival)
                    sent[request_id] = 0
                except ValueError as e:       # the server checked it: should not happen
                    now = time.perf_counter()
                    conn.send(("step", {}, [Finished(request_id, [], None, "error", str(e),
                               len(token_ids), 0, 0, now, None, (), now)], backend.stats()))
            try:
                step()
            except Exception as e:             # the engine survives a failed step: this is fatal
                conn.send(("fatal", f"{type(e).__name__}: {e}"))
                return
    finally:
        backend.close()


class BackendProcess(Backend):
    """`factory(*args, **kwargs)` (picklable: a class) built and stepped in a spawned
    process; `text` is the text half on the server's side; `check(params)` raises
    ValueError for sampling fields the backend would refuse. abort() returns False: the
    request may have finished in the backend meanwhile (the server drops that output).

    add and abort run on the server's event loop (`concurrent_add`): a request reaches the
    backend process at once, not after the step the engine thread is waiting for, so it
    joins the next step formed, as in an offline replay. Only step() receives."""
    concurrent_add = True

    def __init__(self, text, factory, *args, check=None, **kwargs):
        self.text, self.check = text, check
        self.name, self.vocab_size = text.name, text.vocab_size
        self.has_tokenizer, self.has_chat_template = text.has_tokenizer, text.has_chat_template
        self.max_token_bytes = text.max_token_bytes
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=backend_main, args=(child, factory, args, kwargs),
                                   name="twinserve-backend")   # not daemonic: it may spawn TP ranks
        self.process.start()
        child.close()
        kind, info = self._recv()
        if kind == "error":
            self.process.join(timeout=30)
            raise ValueError(info)
        atexit.register(self.close)
        self.outbox, self.send_error = queue.SimpleQueue(), None
        self.send_lock, self.queued = threading.Lock(), 0    # messages the sender thread holds
        threading.Thread(target=self._sender, daemon=True, name="backend-sender").start()
        self.max_model_len = info["max_model_len"]
        self.step_fd = self.conn.fileno()        # the server steps on its event loop
        self.poller = select.poll()
        self.poller.register(self.conn.fileno(), select.POLLOUT)
        with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
            self.inline_bytes = min(INLINE_SEND_BYTES, sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 4)
        self.probe = Scheduler(info["scheduler_config"], info["cache_config"], info["num_blocks"])
        self.tokens: dict[str, list[int]] = {}     # unfinished request -> output tokens so far
        self.late: list[float] = []                # the paced steps' lateness, not yet taken
        self.last_stats = {"running": 0, "waiting": 0, "kv_usage": 0.0, "preemptions": 0,
                           "prefix_queries": 0, "prefix_hits": 0}

    def tokenize(self, prompt):
        return self.text.tokenize(prompt)

    def chat_tokens(self, messages):
        return self.text.chat_tokens(messages)

    def decode(self, token_ids):
        return self.text.decode(token_ids)

    def _dead(self) -> BackendDead:
        self.process.join(timeout=5)
        return BackendDead(f"the backend process died (exit code {self.process.exitcode})")

    def _send(self, message) -> None:
        """Send a message to the backend process without ever blocking the caller (the
        server's event loop) on a full pipe: at once when no message is queued before it,
        it is small and the pipe has room for it; else through the sender thread (whose
        wake-up waits for the interpreter lock: ~1-10 ms behind a busy loop, all of it
        added to the request's time to first token)."""
        if self.send_error is not None:
            raise self._dead()
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self.send_lock:
            if self.queued == 0 and len(data) <= self.inline_bytes and self._writable():
                try:
                    self.conn.send_bytes(data)
                except OSError as e:
                    self.send_error = e
                    raise self._dead() from None
                return
            self.queued += 1
            self.outbox.put(data)

    def _writable(self) -> bool:
        """The pipe has room for a message of `inline_bytes`: a Unix socket (the pipe)
        polls writable while at most a quarter of its send buffer is in use."""
        return bool(self.poller.poll(0))

    def _sender(self) -> None:
        while (data := self.outbox.get()) is not None:
            try:
                self.conn.send_bytes(data)
            except OSError as e:
                self.send_error = e
                return
            with self.send_lock:
                self.queued -= 1

    def _recv(self):
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            raise self._dead() from None
        if message[0] == "fatal":
            raise BackendDead(f"the backend process failed: {message[1]}")
        return message

    def add(self, request_id, token_ids, params, arrival_time=None):
        if arrival_time is None:
            arrival_time = time.perf_counter()
        if self.check is not None:
            self.check(params)
        self.probe.add(Sequence(request_id, token_ids, params.max_tokens))   # the policy's checks
        self.probe.abort(request_id)
        self.tokens[request_id] = []
        try:
            self._send(("add", request_id, token_ids, params, arrival_time))
        except BackendDead:
            del self.tokens[request_id]
            raise

    def abort(self, request_id):
        if self.tokens.pop(request_id, None) is not None:
            self._send(("abort", request_id))
        return False

    def step(self):
        """The backend's next step (waits for it), and any that came meanwhile."""
        messages = [self._recv()]
        while self.conn.poll(0):
            messages.append(self._recv())
        finished = []
        for _, fresh, done, stats in messages:
            self.late += stats.pop("late_s", ())
            for request_id, tokens in fresh.items():
                known = self.tokens.get(request_id)     # an abort may pop it meanwhile
                if known is not None:
                    known += tokens
            finished += [f for f in done if self.tokens.pop(f.request_id, None) is not None]
            self.last_stats = stats
        return finished

    def take_lateness(self):
        late, self.late = self.late, []
        return late

    def output_tokens_since(self, request_id, start):
        return self.tokens.get(request_id, [])[start:]

    def reset_prefix_cache(self):
        """Sent at once; the backend process resets before it takes the next request."""
        if self.tokens:
            raise RuntimeError("the prefix cache can be reset only with no request unfinished")
        self._send(("reset_prefix_cache",))

    def has_unfinished(self):
        return bool(self.tokens)

    def stats(self):
        return self.last_stats

    def close(self):
        atexit.unregister(self.close)
        if self.process.is_alive():
            self.outbox.put(pickle.dumps(("close",)))   # after any message queued before
            self.outbox.put(None)                       # the sender thread's last message
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)


def engine_process(model: str, **engine_kwargs) -> BackendProcess:
    """The engine (`EngineBackend(model, **engine_kwargs)`) in a process of its own."""
    from engine import EngineConfig, SamplingParams
    from engine.engine import load_tokenizer
    from engine.models import ModelConfig
    from server.backend import EngineBackend
    EngineConfig(model=model, **engine_kwargs)        # bad options fail here, at once

    def check(p):
        SamplingParams(temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                       max_tokens=p.max_tokens, ignore_eos=p.ignore_eos, seed=p.seed)
    text = HFText(model, load_tokenizer(model), ModelConfig.from_pretrained(model).vocab_size)
    return BackendProcess(text, EngineBackend, model, check=check, **engine_kwargs)


def sim_process(model: str, hardware: str, **kwargs) -> BackendProcess:
    """The twin (`SimBackend(model, hardware, **kwargs)`) in a process of its own."""
    from server.sim import ByteText, SimBackend
    return BackendProcess(ByteText.of(model), SimBackend, model, hardware, **kwargs)
