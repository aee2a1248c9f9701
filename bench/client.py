"""Replay a trace against any OpenAI-compatible server, the way `vllm bench serve` measures.

Each request is sent at its arrival time (seconds after the start) to /v1/completions with
its prompt as token ids, `max_tokens` = its output length, `ignore_eos` (a vLLM extension:
outputs have the trace's lengths), streaming with usage. Every chunk is timestamped on
arrival. Definitions as vLLM's benchmark: TTFT = first chunk with content - send time;
ITL = gaps between content chunks; E2EL = last content chunk - send time; output length =
the usage's completion_tokens. A request that fails (HTTP error, error event, broken
connection, timeout) is counted as failed.

Two HTTP clients: "lean" (default; bench/http1.py on asyncio streams: a few microseconds
of Python per chunk, so the client's own work does not queue up into the latencies it
measures at thousands of chunks a second) and "httpx" (a general client, the cross-check).
Both feed the same event handler (`take_event`).

The result is a run directory in the project's schema (experiments/results.py):
requests.parquet, steps.parquet (empty: the steps are the server's), summary.json with
mode "http", so `python -m analysis --compare` compares it with an offline or simulated run
of the same trace.
"""
import asyncio
import json
import math
import time
from dataclasses import dataclass, field

import httpx
import numpy as np
import pandas as pd

from analysis.metrics import add_latencies
from bench.http1 import Pool, ProtocolError
from experiments.results import REQUEST_COLUMNS


@dataclass(slots=True)
class Record:
    """What the client saw of one request (times: perf_counter seconds)."""
    request_id: str
    prompt_len: int
    sent: float = math.nan
    chunk_times: list[float] = field(default_factory=list)
    output_len: int = 0
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """Where and what to send. `extra`: fields added to every request body."""
    url: str
    model: str
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 1.0
    timeout_s: float = 6 * 3600
    extra: dict = field(default_factory=dict)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


# /metrics series whose change over a run the client reports (vLLM's names)
SERVER_HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds",
                     "vllm:e2e_request_latency_seconds", "vllm:request_queue_time_seconds",
                     # twinserve's server only: the HTTP path's stages around the engine's TTFT
                     "twinserve:request_prepare_seconds", "twinserve:first_token_handoff_seconds",
                     "twinserve:first_chunk_write_seconds",
                     # the simulated server only: its steps' lateness against the twin's clock
                     "twinserve:pacing_lateness_seconds")
SERVER_COUNTERS = ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions",
                   "vllm:prefix_cache_queries", "vllm:prefix_cache_hits")


def scrape(url: str) -> dict | None:
    """The server's Prometheus sums and counts we report (summed over label sets), or None
    if it has no /metrics (any OpenAI-compatible server may be measured)."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
        r = httpx.get(f"{url}/metrics", timeout=10)
        r.raise_for_status()
        values = {}
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
        return values
    except (ImportError, httpx.HTTPError, ValueError):
        return None


def server_side(before: dict | None, after: dict | None) -> dict | None:
    """What the server measured over the run (from two /metrics scrapes): mean TTFT, ITL,
    E2E latency and queue time in ms, and the token / preemption / prefix-cache counts.
    The client's numbers minus these are the HTTP path's share."""
    if before is None or after is None:
        return None
    delta = lambda name: after.get(name, 0.0) - before.get(name, 0.0)
    out = {}
    for name in SERVER_HISTOGRAMS:
        count = delta(name + "_count")
        short = name.split(":", 1)[1].removesuffix("_seconds")
        out[f"mean_{short}_ms"] = 1000 * delta(name + "_sum") / count if count else None
        out[f"{short}_count"] = int(count)
    for name in SERVER_COUNTERS:
        out[name.removeprefix("vllm:")] = int(delta(name + "_total"))
    return out


def ttft_split(client_ttft_ms: float, server: dict | None) -> dict | None:
    """The client's mean TTFT as the sum of its stages (ms): the server's prepare (handler
    to engine queue), the engine's TTFT, handoff (engine's first token to the stream
    handler), write (to the socket), and what remains: the client and the transport (the
    client's send and parse of the chunk, the loopback, the HTTP parser before the
    handler). None unless the server reports the stages (a twinserve server)."""
    keys = ("mean_request_prepare_ms", "mean_time_to_first_token_ms",
            "mean_first_token_handoff_ms", "mean_first_chunk_write_ms")
    if server is None or any(server.get(k) is None for k in keys):
        return None
    prepare, engine, handoff, write = (server[k] for k in keys)
    return {"prepare_ms": prepare, "engine_ms": engine, "handoff_ms": handoff, "write_ms": write,
            "server_http_ms": prepare + handoff + write,
            "client_ms": client_ttft_ms - prepare - engine - handoff - write}


def server_model(url: str, api_key: str | None = None) -> tuple[str, int | None]:
    """The first model the server lists: its id and max_model_len (vLLM and this project
    list it; None where the server does not)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{url.rstrip('/')}/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    model = r.json()["data"][0]
    return model["id"], model.get("max_model_len")


def reset_prefix_cache(target: Target) -> None:
    """POST /reset_prefix_cache (vLLM's endpoint); RuntimeError saying why if it fails."""
    try:
        r = httpx.post(f"{target.url}/reset_prefix_cache", headers=target.headers, timeout=60)
    except httpx.HTTPError as e:
        raise RuntimeError(f"--reset-prefix-cache: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise RuntimeError(f"--reset-prefix-cache: the server answered HTTP {r.status_code} "
                           f"({r.text[:200]}); vLLM serves it only with VLLM_SERVER_DEV_MODE=1")


def request_body(target: Target, prompt: list[int], max_tokens: int) -> dict:
    return {"model": target.model, "prompt": prompt, "max_tokens": max_tokens,
            "ignore_eos": target.ignore_eos, "temperature": target.temperature, "stream": True,
            "stream_options": {"include_usage": True}} | target.extra


def take_event(record: Record, data: bytes | str, now: float) -> bool:
    """One server-sent event's data, seen at `now`, into `record` (both HTTP clients go
    through here: one definition of TTFT, ITL and output length). True when the stream is
    over: [DONE], or an error event (record.error set)."""
    if data == "[DONE]" or data == b"[DONE]":
        return True
    chunk = json.loads(data)
    if "error" in chunk:
        error = chunk["error"]
        record.error = str(error.get("message", error) if isinstance(error, dict) else error)
        return True
    for choice in chunk.get("choices") or []:
        if choice.get("text") or choice.get("token_ids"):
            record.chunk_times.append(now)
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    usage = chunk.get("usage")
    if usage:
        record.output_len = usage.get("completion_tokens", 0)
        details = usage.get("prompt_tokens_details") or {}
        record.cached_tokens = details.get("cached_tokens") or 0
    return False


def finish_record(record: Record) -> None:
    if record.error is not None:
        return
    if record.finish_reason is None:
        record.error = "the stream ended without a finish_reason"
    if not record.output_len:       # a server without usage in streams
        record.output_len = len(record.chunk_times)


async def send_httpx(client: httpx.AsyncClient, target: Target, prompt: list[int],
                     max_tokens: int, record: Record) -> None:
    """One streamed request through httpx (the cross-check of the lean client)."""
    body = request_body(target, prompt, max_tokens)
    record.sent = time.perf_counter()
    try:
        async with client.stream("POST", f"{target.url}/v1/completions", json=body,
                                 headers=target.headers, timeout=target.timeout_s) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")
                record.error = f"HTTP {r.status_code}: {text[:500]}"
                return
            async for line in r.aiter_lines():
                now = time.perf_counter()
                if line.startswith("data:") and take_event(record, line[5:].strip(), now):
                    break
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return
    finish_record(record)


async def send_lean(pool: Pool, target: Target, prompt: list[int], max_tokens: int,
                    record: Record) -> None:
    """One streamed request through the lean client (bench/http1.py). The stream is read
    to its end after [DONE], so its connection is kept alive for the next request."""
    body = json.dumps(request_body(target, prompt, max_tokens)).encode()
    headers = {"Content-Type": "application/json", **target.headers}
    record.sent = time.perf_counter()
    try:
        async with asyncio.timeout(target.timeout_s):
            async with pool.request("POST", "/v1/completions", body, headers) as r:
                if r.status != 200:
                    text = (await r.read()).decode(errors="replace")
                    record.error = f"HTTP {r.status}: {text[:500]}"
                    return
                done = False
                async for now, data in r.events():
                    if not done:
                        done = take_event(record, data, now)
                        if record.error is not None:
                            return
    except (OSError, ProtocolError, TimeoutError, json.JSONDecodeError, UnicodeDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return
    finish_record(record)


class Sender:
    """Sends streamed requests through one HTTP client for a run: "lean" (bench/http1.py,
    the default) or "httpx"; `async with Sender(...) as send: await send(target, ...)`."""
    CLIENTS = ("lean", "httpx")

    def __init__(self, kind: str, url: str, max_connections: int | None, timeout_s: float):
        if kind not in self.CLIENTS:
            raise ValueError(f"unknown HTTP client {kind!r}; known: {list(self.CLIENTS)}")
        self.kind, self.url, self.max_connections, self.timeout_s = kind, url, max_connections, timeout_s

    async def __aenter__(self):
        if self.kind == "lean":
            self.pool = Pool(self.url)
        else:
            limits = httpx.Limits(max_connections=self.max_connections,
                                  max_keepalive_connections=self.max_connections)
            self.client = await httpx.AsyncClient(limits=limits, timeout=self.timeout_s).__aenter__()
        return self.send

    async def __aexit__(self, *exc):
        if self.kind == "lean":
            await self.pool.aclose()
        else:
            await self.client.__aexit__(*exc)

    async def send(self, target: Target, prompt: list[int], max_tokens: int, record: Record) -> None:
        if self.kind == "lean":
            await send_lean(self.pool, target, prompt, max_tokens, record)
        else:
            await send_httpx(self.client, target, prompt, max_tokens, record)


async def replay(target: Target, requests, max_concurrency: int | None = None,
                 progress=None, http_client: str = "lean") -> tuple[list[Record], float, float]:
    """Send every request at its arrival_s; returns (records, t0, duration_s)."""
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    records = [Record(r.request_id, len(r.prompt_token_ids)) for r in requests]
    async with Sender(http_client, target.url, max_concurrency, target.timeout_s) as send:
        t0 = time.perf_counter()

        async def one(req, record):
            delay = t0 + req.arrival_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if semaphore is None:
                await send(target, list(req.prompt_token_ids), req.output_len, record)
            else:
                async with semaphore:
                    await send(target, list(req.prompt_token_ids), req.output_len, record)
            if progress is not None:
                progress(1)
        await asyncio.gather(*[one(r, rec) for r, rec in zip(requests, records)])
        duration = time.perf_counter() - t0
    return records, t0, duration


async def warm_up(target: Target, prompt_lens: list[int], num: int,
                  max_model_len: int | None = None, http_client: str = "lean") -> None:
    """`num` throwaway requests of token id 0 (sharing no prefix with the trace's prompts)
    at the trace's prompt-length quantiles (below max_model_len): the server compiles
    before the clock starts."""
    if num <= 0:
        return
    lens = np.quantile(prompt_lens, np.linspace(0, 1, num)).astype(int)
    if max_model_len:
        lens = np.minimum(lens, max_model_len - 8)
    records = [Record(f"warmup-{i}", int(n)) for i, n in enumerate(lens)]
    async with Sender(http_client, target.url, None, target.timeout_s) as send:
        await asyncio.gather(*[send(target, [0] * max(1, int(n)), 8, rec)
                               for n, rec in zip(lens, records)])
    failed = [r.error for r in records if r.error]
    if failed:
        raise RuntimeError(f"warm-up request failed: {failed[0]}")


def request_table(records: list[Record], t0: float) -> pd.DataFrame:
    """requests.parquet rows (REQUEST_COLUMNS + error); a failed request has no finish."""
    rows = []
    for r in records:
        ok = r.error is None and r.chunk_times
        times = [t - t0 for t in r.chunk_times] if ok else []
        rows.append({"request_id": r.request_id, "replica": 0, "arrival_s": r.sent - t0,
                     "first_scheduled_s": math.nan,
                     "first_token_s": times[0] if ok else math.nan,
                     "finish_s": times[-1] if ok else math.nan,
                     "prompt_len": r.prompt_len, "output_len": r.output_len if ok else 0,
                     "cached_prompt_tokens": r.cached_tokens, "num_preemptions": 0,
                     "token_times_s": times,
                     "finish_reason": r.finish_reason if ok else "error", "error": r.error})
    return add_latencies(pd.DataFrame(rows, columns=list(REQUEST_COLUMNS) + ["error"]))
