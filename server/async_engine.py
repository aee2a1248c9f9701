"""The bridge between asyncio and a Backend: one engine thread does every add, abort and
step (so the policy is never touched by two threads); an asyncio task keeps it stepping
while requests wait on their own queues. Admission is bounded: past `max_queued`
unfinished requests a new one is refused (503) instead of queuing without limit.

A backend whose steps run in another process (`Backend.step_fd`, `concurrent_add`) needs
no engine thread: the task waits on the event loop for the step's message and reads it
there, so a token reaches its stream without a thread switch.
"""
import asyncio
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from server.backend import Backend, BackendDead, Finished, GenerationParams, sleep_until
from server.metrics import ServerMetrics


class ApiError(Exception):
    """An error the client gets as an OpenAI-style body with this HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(slots=True)
class Stream:
    """Where one request's results go: (index, list of new token ids) while it runs (if
    `stream`), then (index, Finished), or (index, Exception) if the engine died."""
    queue: asyncio.Queue
    index: int
    stream: bool
    sent: int = 0     # output tokens published so far


class AsyncEngine:
    def __init__(self, backend: Backend, metrics: ServerMetrics, max_queued: int):
        self.backend, self.metrics, self.max_queued = backend, metrics, max_queued
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.streams: dict[str, Stream] = {}
        self.wakeup: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.error: Exception | None = None     # set if a step raised: the backend is dead

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    def start(self) -> None:
        self.wakeup = asyncio.Event()
        self.task = asyncio.create_task(self.run())

    async def next_step(self) -> tuple[dict[str, list[int]], list[Finished]]:
        """The next step's results: on the engine thread, or, where the backend's step
        only receives (step_fd), on the loop once its message is there."""
        fd = self.backend.step_fd
        if fd is None:
            return await self.call(self._step)
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        return self._step()

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        self.thread.submit(self.backend.close)
        self.thread.shutdown(wait=True)

    def check_alive(self) -> None:
        if self.error is not None:
            raise ApiError(f"the engine failed and serves no more requests: {self.error!r}", 503)

    async def add(self, prompts: list[list[int]], params: GenerationParams, queue: asyncio.Queue,
                  stream: bool, received: float | None = None) -> list[str]:
        """Queue one request per prompt (all or none); results go to `queue`, tagged with
        the prompt's index. Raises ApiError 400 if the backend refuses one, 503 when the
        server holds `max_queued` requests already. `received`: when the HTTP handler
        started (perf_counter), for the prepare-time histogram."""
        self.check_alive()
        if len(self.streams) + len(prompts) > self.max_queued:
            raise ApiError(f"the server is overloaded: {len(self.streams)} requests are queued "
                           f"or running (--max-queued-requests {self.max_queued}); retry later", 503)
        ids = [f"req-{uuid.uuid4().hex}" for _ in prompts]
        arrival = time.perf_counter()    # here, not after a hop to the engine thread or process
        for index, request_id in enumerate(ids):
            self.streams[request_id] = Stream(queue, index, stream)
        try:
            if self.backend.concurrent_add:      # no wait for the engine thread's step
                self._add(ids, prompts, params, arrival)
            else:
                await self.call(self._add, ids, prompts, params, arrival)
        except (ValueError, BackendDead) as e:
            for request_id in ids:
                self.streams.pop(request_id, None)
            if isinstance(e, BackendDead):
                self.error = e
                raise ApiError(f"the engine failed: {e}", 500) from None
            raise ApiError(str(e)) from None
        if received is not None:
            self.metrics.prepare.observe(arrival - received)
        self.wakeup.set()
        return ids

    def _add(self, ids, prompts, params, arrival) -> None:
        added = []
        try:
            for request_id, token_ids in zip(ids, prompts):
                self.backend.add(request_id, token_ids, params, arrival)
                added.append(request_id)
        except Exception:
            for request_id in added:
                self.backend.abort(request_id)
            raise

    def abort(self, request_ids: list[str]) -> None:
        """Stop publishing to these requests and abort them on the engine thread. Not a
        coroutine on purpose: it runs in `finally` blocks of cancelled tasks, where an await
        would be cancelled too. A request that finished meanwhile is dropped on arrival."""
        request_ids = [r for r in request_ids if self.streams.pop(r, None) is not None]
        if request_ids and self.error is None:
            if self.backend.concurrent_add:
                self._abort(request_ids)
            else:
                self.thread.submit(self._abort, request_ids)

    def _abort(self, request_ids) -> None:
        try:
            for request_id in request_ids:
                self.backend.abort(request_id)
        except BackendDead as e:      # the next add or step reports it
            self.error = e
            return
        if not self.backend.concurrent_add:      # else the stats come with the next step
            self.metrics.after_step(self.backend.stats())

    async def reset_prefix_cache(self) -> None:
        """Empty the backend's prefix cache; ApiError 409 while requests are unfinished."""
        self.check_alive()
        if self.streams:
            raise ApiError(f"the prefix cache can be reset only when no request runs "
                           f"({len(self.streams)} unfinished)", 409)
        try:
            if self.backend.concurrent_add:
                self.backend.reset_prefix_cache()
            else:
                await self.call(self.backend.reset_prefix_cache)
                self.metrics.after_step(self.backend.stats())
        except BackendDead as e:
            self.error = e
            raise ApiError(f"the engine failed: {e}", 500) from None
        except NotImplementedError as e:
            raise ApiError(str(e), 501) from None
        except RuntimeError as e:        # a request came in meanwhile
            raise ApiError(str(e), 409) from None

    def _step(self) -> tuple[dict[str, list[int]], list[Finished]]:
        """One step, then the new tokens of every streamed request (on the engine thread,
        or on the loop where the backend has a step_fd)."""
        finished, due = self.backend.step_due()
        self.metrics.after_step(self.backend.stats())
        for f in finished:
            self.metrics.finished(f)
        first, more = {}, {}
        for request_id, s in self.streams.copy().items():   # copy(): atomic under the GIL
            if s.stream:
                tokens = self.backend.output_tokens_since(request_id, s.sent)
                if tokens:
                    (more if s.sent else first)[request_id] = tokens
                    s.sent += len(tokens)
        if due is not None:           # a paced backend (the twin): hand them on when due
            self.metrics.pacing_late.observe(sleep_until(due))
        for late in self.backend.take_lateness():     # paced in its own process
            self.metrics.pacing_late.observe(late)
        # First tokens are published first: their streams' chunks are written before the
        # step's other chunks (a new request's TTFT does not wait for ~a chunk per running
        # request; those see it as a few microseconds on one inter-token gap each)
        return first | more, finished

    async def run(self) -> None:
        backend = self.backend
        while True:
            if not backend.has_unfinished():
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            try:
                fresh, finished = await self.next_step()
            except Exception as e:      # the engine handles a failed step itself: this is fatal
                self.error = e
                for s in self.streams.values():
                    s.queue.put_nowait((s.index, e))
                self.streams.clear()
                return
            for request_id, tokens in fresh.items():
                s = self.streams.get(request_id)
                if s is not None:
                    s.queue.put_nowait((s.index, tokens))
            for f in finished:
                s = self.streams.pop(f.request_id, None)
                if s is not None:
                    if s.stream and len(f.token_ids) > s.sent:   # the tail the last step made
                        s.queue.put_nowait((s.index, f.token_ids[s.sent:]))
                    s.queue.put_nowait((s.index, f))
