"""The HTTP path around the engine's TTFT, in the server's default layout (the backend in a
process of its own): the stage histograms (prepare, handoff, write) count what was sent
and the benchmark splits its TTFT with them; messages to the backend process keep their
order whether sent at once or through the sender thread; first tokens are published
before a step's other tokens."""
import asyncio
import json
import pickle

import httpx
import pytest

pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")

from bench.client import scrape, server_side, ttft_split  # noqa: E402
from server import build_app  # noqa: E402
from server.async_engine import AsyncEngine, Stream  # noqa: E402
from server.backend import GenerationParams  # noqa: E402
from server.metrics import ServerMetrics  # noqa: E402
from server.process import sim_process  # noqa: E402
from server.thread import serving  # noqa: E402

STAGES = ("request_prepare", "first_token_handoff", "first_chunk_write")


def test_stage_histograms_and_the_ttft_split():
    backend = sim_process("qwen3-0.6b", "h200", num_gpu_blocks=256, max_model_len=512)
    with serving(build_app(backend, "m")) as url:
        before = scrape(url)
        for i in range(3):             # streamed: every stage
            body = {"prompt": list(range(10 + i, 60)), "max_tokens": 4, "stream": True,
                    "ignore_eos": True}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            assert sum(len(c["choices"][0]["token_ids"]) for c in chunks) == 4
            assert all(list(c) == ["id", "object", "created", "model", "choices"] for c in chunks)
            assert len({(c["id"], c["created"], c["model"]) for c in chunks}) == 1
        for prompt in ([5, 6, 7], "a text prompt"):       # not streamed: prepare only
            r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2})
            assert r.status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [1], "top_p": 9})
        assert r.status_code == 400                        # refused: counts nowhere
        server = server_side(before, scrape(url))
    assert server["request_prepare_count"] == 5
    assert server["first_token_handoff_count"] == server["first_chunk_write_count"] == 3
    assert server["time_to_first_token_count"] == 5
    assert all(server[f"mean_{s}_ms"] >= 0 for s in STAGES)
    split = ttft_split(50.0, server)
    parts = ("prepare_ms", "engine_ms", "handoff_ms", "write_ms")
    assert split["client_ms"] + sum(split[k] for k in parts) == pytest.approx(50.0)
    assert split["server_http_ms"] == pytest.approx(split["prepare_ms"] + split["handoff_ms"]
                                                    + split["write_ms"])
    assert ttft_split(50.0, {k: v for k, v in server.items() if "handoff" not in k}) is None


def test_messages_to_the_backend_process_keep_their_order():
    """A prompt too large to send from the event loop goes through the sender thread; an
    abort right after it must not overtake it (the backend would then run the request it
    never heard was aborted), nor may the next small request."""
    backend = sim_process("qwen3-0.6b", "h200", num_gpu_blocks=4096, max_model_len=32768)
    try:
        big = list(range(1, 20_001))
        backend.add("big", big, GenerationParams(max_tokens=500, ignore_eos=True))
        assert len(pickle.dumps(big)) > backend.inline_bytes       # through the sender thread
        backend.abort("big")
        backend.add("small", [1, 2, 3], GenerationParams(max_tokens=3, ignore_eos=True))
        finished = []
        while backend.has_unfinished():
            finished += backend.step()
        assert [f.request_id for f in finished] == ["small"]
        assert len(finished[0].token_ids) == 3
        stats = backend.stats()
        assert stats["running"] == 0 and stats["waiting"] == 0     # "big" never ran on
        assert backend.queued == 0
        # small messages with nothing queued go at once, not through the thread
        backend.add("now", [4, 5], GenerationParams(max_tokens=1))
        assert backend.queued == 0 and backend.outbox.empty()
        while backend.has_unfinished():
            backend.step()
    finally:
        backend.close()


class Tokens:
    """A stand-in backend whose step gives every request one more token."""
    concurrent_add = True
    step_fd = None

    def __init__(self, counts):
        self.counts = counts

    def step(self):
        for r in self.counts:
            self.counts[r] += 1
        return []

    def step_due(self):
        return self.step(), None

    def take_lateness(self):
        return []

    def stats(self):
        return {"running": 0, "waiting": 0, "kv_usage": 0.0, "preemptions": 0,
                "prefix_queries": 0, "prefix_hits": 0}

    def output_tokens_since(self, request_id, start):
        return list(range(start, self.counts[request_id]))


def test_first_tokens_are_published_first():
    async def main():
        backend = Tokens({"old-1": 5, "old-2": 5, "new": 0, "old-3": 5})
        engine = AsyncEngine(backend, ServerMetrics("m"), 10)
        queue = asyncio.Queue()
        for index, request_id in enumerate(backend.counts):
            engine.streams[request_id] = Stream(queue, index, stream=True)
            engine.streams[request_id].sent = 0 if request_id == "new" else 5
        fresh, _ = engine._step()
        assert list(fresh) == ["new", "old-1", "old-2", "old-3"]
        assert fresh["new"] == [0] and fresh["old-2"] == [5]
    asyncio.run(main())

