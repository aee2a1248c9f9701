"""The engine in a process of its own, as vLLM's engine core: the server's Python (HTTP,
JSON, detokenizing thousands of stream chunks a second) never holds the interpreter lock
the engine's host work needs, so serving over HTTP costs the engine no step time.

    server process                              engine process
    EngineProcess.add / abort  -- pipe -->      EngineBackend.add / abort, between steps
    EngineProcess.step  <-- one message a step  EngineBackend.step: new tokens, finished
                                                requests, the policy's stats

The server process validates a request before sending it (sampling fields through
`engine.SamplingParams`, lengths through a probe `policy.Scheduler` of the same config), so
a bad request is a 400 at once and the engine never refuses one it was sent. It tokenizes
and detokenizes with its own copy of the tokenizer.
"""
import atexit
import multiprocessing as mp
import time

from policy import Scheduler, Sequence
from server.backend import Backend, BackendDead, EngineBackend, Finished, HFText


def engine_main(conn, model: str, engine_kwargs: dict) -> None:
    """The engine process: build the engine, then step while there is work, taking
    commands between steps and sending one message per step."""
    try:
        backend = EngineBackend(model, **engine_kwargs)
    except BaseException as e:
        conn.send(("error", f"{e}" if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"))
        return
    engine = backend.engine
    conn.send(("ready", {"max_model_len": engine.config.max_model_len,
                         "scheduler_config": engine.config.scheduler_config(),
                         "cache_config": engine.config.cache_config(),
                         "num_blocks": engine.scheduler.block_manager.num_blocks}))
    sent: dict[str, int] = {}      # unfinished request -> output tokens sent so far
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
                request_id, token_ids, params = args
                try:
                    backend.add(request_id, token_ids, params)
                    sent[request_id] = 0
                except ValueError as e:       # the server checked it: should not happen
                    now = time.perf_counter()
                    conn.send(("step", {}, [Finished(request_id, [], None, "error", str(e),
                               len(token_ids), 0, 0, now, None, (), now)], backend.stats()))
            try:
                finished = backend.step()
            except Exception as e:             # only a dead tensor-parallel worker gets here
                conn.send(("fatal", f"{type(e).__name__}: {e}"))
                return
            fresh = {}
            for request_id, start in sent.items():
                tokens = backend.output_tokens_since(request_id, start)
                if tokens:
                    fresh[request_id] = tokens
                    sent[request_id] = start + len(tokens)
            for f in finished:
                sent.pop(f.request_id, None)
            conn.send(("step", fresh, finished, backend.stats()))
    finally:
        backend.close()


class EngineProcess(HFText, Backend):
    """`EngineProcess(model_path, **EngineConfig fields)`: an EngineBackend in a spawned
    process. abort() returns False: the request may have finished in the engine meanwhile
    (its output is then dropped by the server on arrival)."""

    def __init__(self, model: str, **engine_kwargs):
        from engine import EngineConfig, SamplingParams
        from engine.engine import load_tokenizer
        from engine.models import ModelConfig
        EngineConfig(model=model, **engine_kwargs)        # bad options fail here, at once
        self.sampling_params = SamplingParams
        self.name = model
        self.init_text(load_tokenizer(model), ModelConfig.from_pretrained(model).vocab_size)
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=engine_main, args=(child, model, engine_kwargs),
                                   name="twinserve-engine")   # not daemonic: it may spawn TP ranks
        self.process.start()
        child.close()
        kind, info = self._recv()
        if kind == "error":
            self.process.join(timeout=30)
            raise ValueError(info)
        atexit.register(self.close)
        self.max_model_len = info["max_model_len"]
        self.probe = Scheduler(info["scheduler_config"], info["cache_config"], info["num_blocks"])
        self.tokens: dict[str, list[int]] = {}     # unfinished request -> output tokens so far
        self.last_stats = {"running": 0, "waiting": 0, "kv_usage": 0.0, "preemptions": 0,
                           "prefix_queries": 0, "prefix_hits": 0}

    def _dead(self) -> BackendDead:
        self.process.join(timeout=5)
        return BackendDead(f"the engine process died (exit code {self.process.exitcode})")

    def _send(self, message) -> None:
        try:
            self.conn.send(message)
        except OSError:
            raise self._dead() from None

    def _recv(self):
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            raise self._dead() from None
        if message[0] == "fatal":
            raise BackendDead(f"the engine process failed: {message[1]}")
        return message

    def add(self, request_id, token_ids, params):
        sp = self.sampling_params(temperature=params.temperature, top_k=params.top_k,
                                  top_p=params.top_p, max_tokens=params.max_tokens,
                                  ignore_eos=params.ignore_eos, seed=params.seed)
        self.probe.add(Sequence(request_id, token_ids, params.max_tokens))   # the engine's checks
        self.probe.abort(request_id)
        self._send(("add", request_id, token_ids, sp))
        self.tokens[request_id] = []

    def abort(self, request_id):
        if self.tokens.pop(request_id, None) is not None:
            self._send(("abort", request_id))
        return False

    def step(self):
        """The engine's next step (waits for it), and any that came meanwhile."""
        messages = [self._recv()]
        while self.conn.poll(0):
            messages.append(self._recv())
        finished = []
        for _, fresh, done, stats in messages:
            for request_id, tokens in fresh.items():
                if request_id in self.tokens:
                    self.tokens[request_id] += tokens
            finished += [f for f in done if self.tokens.pop(f.request_id, None) is not None]
            self.last_stats = stats
        return finished

    def output_tokens_since(self, request_id, start):
        return self.tokens.get(request_id, [])[start:]

    def has_unfinished(self):
        return bool(self.tokens)

    def stats(self):
        return self.last_stats

    def close(self):
        atexit.unregister(self.close)
        if self.process.is_alive():
            try:
                self.conn.send(("close",))
            except OSError:
                pass
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=10)
