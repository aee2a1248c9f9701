"""A lean HTTP/1.1 client on asyncio streams, for timing server-sent event streams.

The benchmark client reads thousands of stream chunks a second; a general client (httpx)
spends tens of microseconds of Python on each (its HTTP parser, decoders and line
splitter), and at high load that time queues up in the client's one event loop and reads
as the server's latency. This client does only what a streaming benchmark needs, with
asyncio's StreamReader doing the buffering:

- POST with a body (JSON), GET; http:// and https:// URLs;
- response bodies framed by Transfer-Encoding: chunked, Content-Length, or the end of the
  connection;
- keep-alive: a connection whose response was read to its end goes back to an idle pool
  (one is opened per request in flight otherwise); a request that meets a connection the
  server had closed while idle is retried once on a new one, as a general client does;
- `SSEParser`: the `data` of each event, fed bytes in any split (events split across
  reads or several in one read, \\n or \\r\\n line ends).

    pool = Pool("http://127.0.0.1:8000")
    async with pool.request("POST", "/v1/completions", body, headers) as r:
        async for t, data in r.events():      # t: perf_counter when its bytes arrived
            ...
    await pool.aclose()
"""
import asyncio
import ssl
import time
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

READ_LIMIT = 1 << 20    # longest header line or chunk-size line StreamReader buffers


class ProtocolError(Exception):
    """The server's answer is not the HTTP/1.1 this client reads, or the connection broke."""


class SSEParser:
    """Server-sent events, incrementally (the WHATWG rules this benchmark needs): lines end
    in \\n or \\r\\n; `data:` lines of an event join with \\n; a blank line ends the event;
    comments (`:`) and other fields (event, id, retry) are skipped."""

    def __init__(self):
        self.buffer = bytearray()
        self.data: list[bytes] = []       # the data lines of the event being read

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event `chunk` completes (bytes; UTF-8 JSON for OpenAI)."""
        buf = self.buffer
        buf += chunk
        events, start = [], 0
        while (end := buf.find(b"\n", start)) >= 0:
            line = buf[start:end - 1] if end > start and buf[end - 1] == 13 else buf[start:end]
            start = end + 1
            if not line:
                if self.data:
                    events.append(self.data[0] if len(self.data) == 1 else b"\n".join(self.data))
                    self.data = []
            elif line.startswith(b"data:"):
                self.data.append(bytes(line[6:] if line.startswith(b"data: ") else line[5:]))
        del buf[:start]
        return events


class Response:
    """Status, headers (lowercase names) and a body to read once, by pieces, whole, or as
    server-sent events."""

    def __init__(self, status: int, reason: str, headers: dict[str, str], reader: asyncio.StreamReader):
        self.status, self.reason, self.headers, self.reader = status, reason, headers, reader
        self.complete = False     # the body was read to its end (the connection may be reused)
        self.keep_alive = headers.get("connection", "").lower() != "close"

    async def pieces(self):
        """The body's bytes as they arrive (chunk by chunk, without the chunked framing)."""
        reader, headers = self.reader, self.headers
        try:
            if "chunked" in headers.get("transfer-encoding", "").lower():
                while True:
                    size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                    if size == 0:
                        while await reader.readuntil(b"\r\n") != b"\r\n":   # trailers
                            pass
                        break
                    data = await reader.readexactly(size)
                    if await reader.readexactly(2) != b"\r\n":
                        raise ProtocolError("a chunk of the body does not end in CRLF")
                    yield data
            elif "content-length" in headers:
                left = int(headers["content-length"])
                while left > 0:
                    data = await reader.read(min(left, 1 << 16))
                    if not data:
                        raise ProtocolError(f"the connection closed with {left} bytes of the body unread")
                    left -= len(data)
                    yield data
            else:                            # the body ends with the connection
                self.keep_alive = False
                while data := await reader.read(1 << 16):
                    yield data
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as e:
            raise ProtocolError(f"malformed or cut body: {type(e).__name__}: {e}") from None
        self.complete = True

    async def read(self) -> bytes:
        return b"".join([data async for data in self.pieces()])

    async def events(self):
        """(arrival time, data) of each server-sent event; the time is perf_counter when
        the piece of the body that completed the event was read."""
        parser = SSEParser()
        async for data in self.pieces():
            now = time.perf_counter()
            for event in parser.feed(data):
                yield now, event


class Pool:
    """Connections to one origin (`url`'s scheme, host and port; its path is prefixed to
    every request's), kept alive between requests."""

    def __init__(self, url: str, connect_timeout_s: float = 30.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the URL must be http://HOST[:PORT][/PATH] or https://..., got {url!r}")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        default = parts.port is None
        self.authority = (f"[{self.host}]" if ":" in self.host else self.host) + ("" if default else f":{self.port}")
        self.connect_timeout_s = connect_timeout_s
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0        # connections opened so far (keep-alive reuses them)

    async def _connect(self):
        while self.idle:                     # the most recently used first
            reader, writer = self.idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer, True
            writer.close()
        context = ssl.create_default_context() if self.https else None
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=context, limit=READ_LIMIT),
            self.connect_timeout_s)
        self.opened += 1
        return reader, writer, False

    def _head(self, method: str, path: str, headers: dict, length: int) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.authority}",
                 "User-Agent: twinserve-bench", "Accept: */*"]
        if method != "GET" or length:
            lines.append(f"Content-Length: {length}")
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    @staticmethod
    async def _response(reader) -> Response:
        status_line = await reader.readuntil(b"\r\n")
        try:
            version, status, *reason = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
            code = int(status)
        except ValueError:
            raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:100]!r}") from None
        headers = {}
        while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise ProtocolError(f"malformed header line: {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
        response = Response(code, reason[0] if reason else "", headers, reader)
        if version == "HTTP/1.0" and headers.get("connection", "").lower() != "keep-alive":
            response.keep_alive = False
        return response

    @asynccontextmanager
    async def request(self, method: str, path: str, body: bytes = b"", headers: dict | None = None):
        """Send a request; yields its Response (read its body inside the block). The
        connection goes back to the pool if the body was read to its end, else it closes.
        Raises ProtocolError or OSError (refused, reset, ...)."""
        message = self._head(method, path, headers or {}, len(body)) + body
        for attempt in range(2):
            reader, writer, reused = await self._connect()
            try:
                writer.write(message)
                await writer.drain()
                response = await self._response(reader)
                break
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
                writer.close()
                stale = reused and (not isinstance(e, asyncio.IncompleteReadError) or not e.partial)
                if attempt == 0 and stale:    # the server closed it while it was idle: again
                    continue
                if isinstance(e, OSError):
                    raise
                raise ProtocolError(f"no response: {type(e).__name__}: {e}") from None
            except BaseException:
                writer.close()
                raise
        try:
            yield response
        finally:
            if response.complete and response.keep_alive:
                self.idle.append((reader, writer))
            else:
                writer.close()

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()
