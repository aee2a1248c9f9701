"""The benchmark's lean HTTP/1.1 client (bench/http1.py): server-sent events however the
bytes are split, chunked / Content-Length / close-delimited bodies, keep-alive (one
connection for sequential requests, a new one after `Connection: close`, a retry when the
server closed an idle connection), cut or malformed bodies as errors; and through the
benchmark's `send_lean` against the twin's server: the same records as the httpx client,
error events and refused requests as failures."""
import asyncio
import json
import random

import pytest

from bench.client import Record, Target, send_httpx, send_lean
from bench.http1 import Pool, ProtocolError, SSEParser

EVENTS = [b'{"a": 1}', b'{"text": "x\\ny"}', b"[DONE]"]
STREAM = b'data: {"a": 1}\n\n: a comment\nevent: message\ndata: {"text": "x\\ny"}\r\n\r\ndata:[DONE]\n\n'


def test_sse_parser_any_split():
    """Every split of the stream into pieces gives the same events (comments, other fields,
    \\r\\n line ends, no space after `data:`); an event without its blank line stays pending."""
    whole = SSEParser().feed(STREAM)
    assert whole == EVENTS
    for cut in range(1, len(STREAM)):           # every two-piece split
        parser = SSEParser()
        assert parser.feed(STREAM[:cut]) + parser.feed(STREAM[cut:]) == EVENTS, cut
    parser, got = SSEParser(), []
    for byte in STREAM:                         # byte by byte
        got += parser.feed(bytes([byte]))
    assert got == EVENTS
    parser = SSEParser()
    assert parser.feed(b"data: line one\ndata: line two\n\ndata: {\"b\"") == [b"line one\nline two"]
    assert parser.feed(b": 2}") == [] and parser.feed(b"\n\n") == [b'{"b": 2}']


def chunked(payload: bytes, pieces: list[int]) -> bytes:
    out, at = b"", 0
    for n in pieces:
        out += f"{n:x}\r\n".encode() + payload[at:at + n] + b"\r\n"
        at += n
    return out + b"0\r\n\r\n"


class Script:
    """A loopback server answering each request with the next scripted reply: bytes, a
    list of byte pieces written with a pause between them, "close" (hang up without an
    answer) or "silent" (never answer); `close_after` closes the connection after that
    many replies. Counts the connections it accepted."""

    def __init__(self, replies, close_after: int | None = None):
        self.replies, self.close_after, self.connections, self.requests = list(replies), close_after, 0, []

    async def handle(self, reader, writer):
        self.connections += 1
        served = 0
        try:
            while self.replies:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append((head, await reader.readexactly(length)))
                reply = self.replies.pop(0)
                if reply == "close":            # hang up without answering
                    break
                if reply == "silent":           # never answer
                    await asyncio.sleep(30)
                for piece in reply if isinstance(reply, list) else [reply]:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(0.001)
                served += 1
                if self.close_after is not None and served >= self.close_after:
                    break
        except asyncio.IncompleteReadError:
            pass
        writer.close()

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc):
        self.server.close()


def sse_reply(events: list[bytes], split_seed: int = 0) -> list[bytes]:
    """A 200 SSE response, chunked, its bytes written in random pieces."""
    body = b"".join(b"data: " + e + b"\n\n" for e in events)
    rng = random.Random(split_seed)
    sizes, left = [], len(body)
    while left:
        sizes.append(min(left, rng.randint(1, 40)))
        left -= sizes[-1]
    raw = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
           + chunked(body, sizes))
    cuts = sorted(rng.sample(range(1, len(raw)), 12))
    return [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)])]


def json_reply(status: int, obj, close: bool = False) -> bytes:
    body = json.dumps(obj).encode()
    return (f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            + ("connection: close\r\n" if close else "") + "\r\n").encode() + body


async def get_events(pool, path="/v1/x", body=b"{}"):
    async with pool.request("POST", path, body, {"Content-Type": "application/json"}) as r:
        assert r.status == 200
        return [data async for _, data in r.events()]


def test_chunked_sse_and_keep_alive():
    async def main():
        events = [json.dumps({"i": i, "text": "é" * i}).encode() for i in range(30)]
        script = Script([sse_reply(events, 1), sse_reply(events, 2), json_reply(400, {"e": 1}),
                         sse_reply(events, 3)])
        async with script as url:
            pool = Pool(url + "/base")
            assert await get_events(pool) == events
            assert await get_events(pool) == events
            async with pool.request("POST", "/v1/x", b"{}") as r:
                assert r.status == 400 and json.loads(await r.read()) == {"e": 1}
            assert await get_events(pool) == events
            await pool.aclose()
        assert script.connections == pool.opened == 1        # all four on one connection
        head, body = script.requests[0]
        assert head.startswith(b"POST /base/v1/x HTTP/1.1\r\n") and b"Content-Length: 2" in head
        assert body == b"{}"
    asyncio.run(main())


def test_connection_close_and_stale_idle_connections():
    """`Connection: close` is honoured (the next request opens a connection); a connection
    the server closed while idle is noticed, or, when the close meets the request, the
    request is retried once on a new connection: never reported as a failure."""
    async def main():
        script = Script([json_reply(200, {"n": 1}, close=True), json_reply(200, {"n": 2}),
                         json_reply(200, {"n": 3})], close_after=1)
        async with script as url:
            pool = Pool(url)
            for n in (1, 2):
                async with pool.request("GET", "/") as r:
                    assert json.loads(await r.read()) == {"n": n}
            await asyncio.sleep(0.05)          # the server has closed the idle connection
            async with pool.request("GET", "/") as r:
                assert json.loads(await r.read()) == {"n": 3}
            await pool.aclose()
        assert script.connections == 3
        script = Script([json_reply(200, {"n": 1}), "close", json_reply(200, {"n": 2})])
        async with script as url:
            pool = Pool(url)
            for n in (1, 2):
                async with pool.request("GET", "/") as r:
                    assert json.loads(await r.read()) == {"n": n}
            await pool.aclose()
        assert script.connections == pool.opened == 2
        assert len(script.requests) == 3               # the second request, sent twice
        async with Script(["close"]) as url:           # a fresh connection is not retried
            with pytest.raises(ProtocolError, match="no response"):
                async with Pool(url).request("GET", "/"):
                    pass
    asyncio.run(main())


def test_cut_and_malformed_responses_are_errors():
    async def main():
        cut = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10\r\ndata: {}\n\n"
        short = b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\nonly this"
        for reply in (cut, short, b"SMTP ready\r\n\r\n"):
            async with Script([reply], close_after=1) as url:
                pool = Pool(url)
                with pytest.raises(ProtocolError):
                    async with pool.request("GET", "/") as r:
                        await r.read()
                assert not pool.idle                 # a broken connection is not reused
        with pytest.raises(ValueError, match="URL"):
            Pool("ftp://x")
        # a body without a length ends with the connection
        async with Script([b"HTTP/1.1 200 OK\r\n\r\ndata: 1\n\n"], close_after=1) as url:
            pool = Pool(url)
            async with pool.request("GET", "/") as r:
                assert [d async for _, d in r.events()] == [b"1"] and not r.keep_alive
            assert not pool.idle
    asyncio.run(main())


@pytest.fixture(scope="module")
def url():
    pytest.importorskip("fastapi")
    from server import build_app
    from server.sim import SimBackend
    from server.thread import serving
    backend = SimBackend("qwen3-0.6b", "h200", num_gpu_blocks=256, max_model_len=256)
    with serving(build_app(backend, "sim")) as url:
        yield url


def test_lean_and_httpx_clients_record_the_same(url):
    """Both clients through the benchmark's send functions: the same output lengths, one
    content chunk per token with ordered times, the same errors (a refused request, an
    error event)."""
    import httpx
    target = Target(url, "sim")

    async def run(prompt, max_tokens, extra=None):
        t = Target(url, "sim", extra=extra or {})
        lean, other = Record("a", len(prompt)), Record("b", len(prompt))
        pool = Pool(url)
        await send_lean(pool, t, prompt, max_tokens, lean)
        await send_lean(pool, t, prompt, max_tokens, Record("c", 1))    # reuses the connection
        async with httpx.AsyncClient() as client:
            await send_httpx(client, t, prompt, max_tokens, other)
        opened = pool.opened
        await pool.aclose()
        return lean, other, opened
    lean, other, opened = asyncio.run(run(list(range(10, 40)), 17))
    assert opened == 1
    for r in (lean, other):
        assert r.error is None and r.output_len == 17 and r.finish_reason == "length"
        assert len(r.chunk_times) == 17 and r.chunk_times == sorted(r.chunk_times)
        assert r.sent < r.chunk_times[0]
    lean, other, _ = asyncio.run(run(list(range(300)), 5))          # longer than max_model_len
    assert lean.error.startswith("HTTP 400") and other.error.startswith("HTTP 400")
    assert "max_model_len" in lean.error
    lean, other, _ = asyncio.run(run([1, 2], 3, {"top_p": 5}))
    assert lean.error == other.error and "top_p" in lean.error
    assert target.headers == {}


def test_error_event_and_timeout():
    """An error event ends the request as failed with its message; a server that never
    answers is a timeout, not a hang."""
    async def main():
        error = [b'{"choices": [{"text": "a", "index": 0}]}',
                 b'{"error": {"message": "the engine failed", "code": 500}}', b"[DONE]"]
        silent = Script(["silent"])
        async with Script([sse_reply(error)]) as url:
            record = Record("e", 3)
            await send_lean(Pool(url), Target(url, "m"), [1, 2, 3], 5, record)
        assert record.error == "the engine failed" and len(record.chunk_times) == 1
        async with silent as url:
            record = Record("t", 3)
            await send_lean(Pool(url), Target(url, "m", timeout_s=0.3), [1, 2, 3], 5, record)
        assert record.error.startswith("TimeoutError")
    asyncio.run(main())
