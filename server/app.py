"""The OpenAI-compatible HTTP API over a Backend.

Endpoints: POST /v1/completions and /v1/chat/completions (with "stream": true they answer
with server-sent events ending in `data: [DONE]`), GET /v1/models, /health, /metrics, and
POST /reset_prefix_cache (vLLM's: benchmarks start each run from an empty prefix cache).

Isolation, request by request:
- every error is an OpenAI-style body {"error": {"message", "type", "param", "code"}}
  with its HTTP status (400 bad request, 401 bad API key, 404, 405, 413 body too large,
  500, 503 overloaded or engine down);
- the body is read with a size limit, then parsed, validated and tokenized on a worker
  thread: a huge prompt never stalls the event loop (other streams, /health);
- a client that goes away, streaming or not, aborts its requests (their KV blocks are
  freed at once);
- a failure inside a step ends that step's requests with an error (500 / an SSE error
  event); the engine keeps serving the rest.
"""
import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from server.async_engine import ApiError, AsyncEngine
from server.backend import Backend, Finished, GenerationParams
from server.metrics import ServerMetrics
from server.protocol import ChatRequest, CompletionRequest, SamplingFields, parse

ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
               405: "MethodNotAllowedError", 409: "ConflictError", 413: "RequestTooLargeError",
               422: "BadRequestError", 429: "RateLimitError", 500: "InternalServerError",
               501: "NotImplementedError", 503: "ServiceUnavailableError"}
DEFAULT_MAX_TOKENS = 16     # /v1/completions, as OpenAI; chat: whatever fits max_model_len
PROBE_CHARS_PER_TOKEN = 16  # text is 3-5 characters a token: a head this long says "too long"
INLINE_BODY_BYTES = 16 << 10   # a completion body of token ids this small is parsed on the loop


def error_response(message: str, status: int, param: str | None = None) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "Error"),
                      "param": param, "code": status}}
    return JSONResponse(body, status, headers=headers)


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class Detokenizer:
    """Text deltas of a growing token list, decoding a short window each time (prefix and
    read offsets, as vLLM): O(new tokens) per call, and a character split across tokens
    (a trailing U+FFFD) is held back until the next token completes it."""

    def __init__(self, decode):
        self.decode, self.token_ids, self.prefix, self.read = decode, [], 0, 0

    def add(self, token_ids: list[int], final: bool = False) -> str:
        self.token_ids += token_ids
        before = self.decode(self.token_ids[self.prefix:self.read])
        text = self.decode(self.token_ids[self.prefix:])
        if len(text) <= len(before) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.token_ids)
        return text[len(before):]


def usage(outputs: list[Finished]) -> dict:
    prompt = sum(o.num_prompt_tokens for o in outputs)
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in outputs)}}


def check_error(out: Finished) -> None:
    if out.finish_reason == "error":
        raise ApiError(f"the request failed inside an engine step: {out.error}", 500)


def build_app(backend: Backend, served_model_name: str | None = None, api_key: str | None = None,
              max_request_bytes: int = 16 << 20, max_queued_requests: int = 4096,
              tokenizer_threads: int = 2) -> FastAPI:
    """The FastAPI app serving `backend` as `served_model_name` (default: the last part of
    its model path). The app owns the backend: shutting the app down closes it."""
    server = OpenAIServer(backend, served_model_name, api_key, max_request_bytes,
                          max_queued_requests, tokenizer_threads)

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        await server.engine.stop()
        server.workers.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="twinserve", lifespan=lifespan)
    app.state.engine, app.state.metrics, app.state.backend = server.engine, server.metrics, backend

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(str(e), e.status, e.param)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return error_response(str(e.detail), e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        return error_response(f"internal server error: {type(e).__name__}: {e}", 500)

    app.get("/health")(server.health)
    app.get("/metrics")(server.prometheus)
    app.post("/reset_prefix_cache")(server.reset_prefix_cache)
    app.get("/v1/models")(server.models)
    app.post("/v1/completions")(server.completions)
    app.post("/v1/chat/completions")(server.chat_completions)
    return app


class OpenAIServer:
    """The endpoints and what they share: the AsyncEngine over the backend, its metrics, and
    the worker threads that parse, tokenize and detokenize off the event loop. A request goes
    through three stages: its body read, parsed and tokenized (`read_body`, `loads`,
    `tokenize`, `completion_prompts`, `chat_prompt`, `params`), submitted to the engine
    (`submit`), its outputs collected or streamed (`collect`, `stream`)."""

    def __init__(self, backend: Backend, served_model_name: str | None, api_key: str | None,
                 max_request_bytes: int, max_queued_requests: int, tokenizer_threads: int):
        self.backend, self.api_key, self.max_request_bytes = backend, api_key, max_request_bytes
        self.name = served_model_name or backend.name.rstrip("/").rsplit("/", 1)[-1]
        self.metrics = ServerMetrics(self.name)
        self.engine = AsyncEngine(backend, self.metrics, max_queued_requests)
        # Tokenization, parsing and detokenizing whole outputs: off the event loop, bounded.
        self.workers = ThreadPoolExecutor(max_workers=tokenizer_threads, thread_name_prefix="tokenizer")
        # A prompt longer than this many bytes cannot fit max_model_len (no token is longer).
        self.max_token_bytes = backend.max_token_bytes

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.workers, fn, *args)

    def authorize(self, request: Request) -> None:
        """With --api-key, every /v1 endpoint needs `Authorization: Bearer <key>`."""
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ApiError("invalid or missing API key (Authorization: Bearer ...)", 401)

    # ---- request bodies ---------------------------------------------------------------------
    async def read_body(self, request: Request) -> bytes:
        """The body, at most max_request_bytes (parsed later, on a worker thread)."""
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise ApiError(f"the request body ({declared} bytes) exceeds the limit of "
                           f"{limit} bytes (--max-request-bytes)", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(f"the request body exceeds the limit of {limit} "
                               "bytes (--max-request-bytes)", 413)
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def loads(body: bytes):
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ApiError(f"the request body is not valid UTF-8: {e}") from None
        except RecursionError:
            raise ApiError("the request body nests too deeply") from None
        except json.JSONDecodeError as e:
            raise ApiError(f"the request body is not valid JSON: {e}") from None

    def check_model(self, req: SamplingFields) -> None:
        if req.model is not None and req.model != self.name:
            raise ApiError(f"the model {req.model!r} does not exist; this server serves {self.name!r}",
                           404, "model")

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """On a worker thread."""
        backend = self.backend
        if isinstance(prompt, str):
            if not backend.has_tokenizer:
                raise ApiError(f"the model {self.name!r} has no tokenizer: send the prompt as token ids",
                               param="prompt")
            try:
                data = prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(f"the prompt is not valid Unicode: {e}", param="prompt") from None
            if len(data) > self.max_token_bytes * backend.max_model_len:
                raise ApiError(f"the prompt ({len(data)} bytes) is longer than max_model_len="
                               f"{backend.max_model_len} tokens can be", param="prompt")
            # A long text is probed first: if its head alone has more tokens than fit, so
            # has the whole (a huge prompt is refused in a fraction of its tokenizing time).
            probe = PROBE_CHARS_PER_TOKEN * backend.max_model_len
            if len(prompt) > probe and len(backend.tokenize(prompt[:probe])) > backend.max_model_len + 16:
                raise ApiError(f"the prompt has more tokens than max_model_len="
                               f"{backend.max_model_len}", param="prompt")
        try:
            token_ids = backend.tokenize(prompt)
        except ValueError as e:
            raise ApiError(str(e), param="prompt") from None
        if not token_ids:
            raise ApiError("the prompt is empty", param="prompt")
        return token_ids

    def check_token_prompts(self, data) -> None:
        """Refuse token-id prompts longer than max_model_len before validating them (which
        holds the interpreter for a second on a body of millions of ids)."""
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], (list, str)):
            prompt = [prompt]
        for p in prompt if isinstance(prompt, list) else ():
            if isinstance(p, list) and len(p) > self.backend.max_model_len:
                raise ApiError(f"a prompt of {len(p)} token ids is longer than max_model_len="
                               f"{self.backend.max_model_len}", param="prompt")

    def completion_prompts(self, req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError("the prompt is empty", param="prompt")
        return [self.tokenize(p) for p in prompt]

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        backend = self.backend
        if not req.messages:
            raise ApiError("messages must hold at least one message", param="messages")
        if not backend.has_chat_template:
            raise ApiError(f"the model {self.name!r} has no chat template: use /v1/completions")
        messages = []
        for i, m in enumerate(req.messages):
            text = m.text()
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ApiError(f"messages.{i}.content is not valid Unicode: {e}",
                               param=f"messages.{i}.content") from None
            messages.append({"role": m.role, "content": text})
        size = sum(len(m["content"]) for m in messages)
        if size > self.max_token_bytes * backend.max_model_len:
            raise ApiError(f"the messages ({size} characters) are longer than max_model_len="
                           f"{backend.max_model_len} tokens can be", param="messages")
        try:
            return backend.chat_tokens(messages)
        except Exception as e:     # a template may raise anything on odd conversations
            raise ApiError(f"the chat template failed on these messages: {e}",
                           param="messages") from None

    @staticmethod
    def params(req: SamplingFields, max_tokens: int) -> GenerationParams:
        try:
            return GenerationParams(
                max_tokens=max_tokens, seed=req.seed, ignore_eos=bool(req.ignore_eos),
                temperature=1.0 if req.temperature is None else req.temperature,
                top_k=-1 if req.top_k is None else req.top_k,
                top_p=1.0 if req.top_p is None else req.top_p)
        except ValueError as e:
            raise ApiError(str(e), param=str(e).split()[0]) from None

    # ---- running requests -------------------------------------------------------------------
    async def submit(self, prompts, gen: GenerationParams, is_stream: bool, received: float):
        queue = asyncio.Queue()
        return queue, await self.engine.add(prompts, gen, queue, is_stream, received)

    async def collect(self, queue: asyncio.Queue, request_ids: list[str]) -> list[Finished]:
        outputs = [None] * len(request_ids)
        try:
            while any(o is None for o in outputs):
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise ApiError(f"the engine failed: {item!r}", 500)
                if isinstance(item, Finished):
                    outputs[index] = item
        finally:
            self.engine.abort([r for r, o in zip(request_ids, outputs) if o is None])
        return outputs

    async def stream(self, queue, request_ids, base: dict, make_choice, first_choice, include_usage):
        """SSE events: base | {"choices": [...]}: an optional first choice, then one per
        delta (make_choice(index, text, token_ids, finish_reason)), an optional usage chunk,
        [DONE]. A request that fails sends an error event and ends the stream. Aborts
        whatever is unfinished when the client goes away (the generator is closed). The
        events waiting when the stream wakes are written together (one send, not one per
        event: a loop that fell behind catches up)."""
        backend, metrics = self.backend, self.metrics
        detoks = [Detokenizer(backend.decode) if backend.has_tokenizer else None
                  for _ in request_ids]
        outputs = [None] * len(request_ids)
        got = [None] * len(request_ids)        # when the first tokens came off the queue
        written = [None] * len(request_ids)    # when their chunk was written to the socket
        # = sse(base | {"choices": [choice]}), with base encoded once, not at every token
        head = f'data: {json.dumps(base)[:-1]}, "choices": ['

        def event(choice: dict) -> str:
            return f"{head}{json.dumps(choice)}]}}\n\n"
        try:
            if first_choice is not None:
                yield event(first_choice)
            while any(o is None for o in outputs):
                items = [await queue.get()]
                while not queue.empty():     # behind the engine: what waits goes in one write
                    items.append(queue.get_nowait())
                now = time.perf_counter()
                events, firsts, finished = [], [], []
                for index, item in items:
                    if isinstance(item, Exception) or (isinstance(item, Finished)
                                                       and item.finish_reason == "error"):
                        message = (f"the engine failed: {item!r}" if isinstance(item, Exception)
                                   else f"the request failed inside an engine step: {item.error}")
                        yield "".join(events) + sse({"error": {
                            "message": message, "type": "InternalServerError", "param": None,
                            "code": 500}}) + sse("[DONE]")
                        return
                    detok = detoks[index]
                    if isinstance(item, Finished):
                        outputs[index] = item
                        text = detok.add([], final=True) if detok else ""
                        events.append(event(make_choice(index, text, [], item.finish_reason)))
                        finished.append((index, item))
                    else:
                        if got[index] is None:
                            got[index] = now
                            firsts.append(index)
                        text = detok.add(item) if detok else ""
                        events.append(event(make_choice(index, text, item, None)))
                yield "".join(events)
                now = time.perf_counter()     # resumed: the chunk was sent
                for index in firsts:
                    written[index] = now
                for index, item in finished:
                    if got[index] is not None and item.token_times:
                        metrics.handoff.observe(got[index] - item.token_times[0])
                        metrics.write.observe(written[index] - got[index])
            if include_usage:
                yield sse(base | {"choices": [], "usage": usage(outputs)})
            yield sse("[DONE]")
        finally:
            self.engine.abort([r for r, o in zip(request_ids, outputs) if o is None])

    # ---- endpoints --------------------------------------------------------------------------
    async def health(self):
        self.engine.check_alive()
        return Response(status_code=200)

    async def prometheus(self):
        return Response(self.metrics.render(), media_type=self.metrics.content_type)

    async def reset_prefix_cache(self, request: Request):
        """vLLM's endpoint (there behind VLLM_SERVER_DEV_MODE; here behind --api-key):
        an empty prefix cache, as an offline replay starts with. 409 while requests run."""
        self.authorize(request)
        await self.engine.reset_prefix_cache()
        return Response(status_code=200)

    async def models(self, request: Request):
        self.authorize(request)
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                            "owned_by": "twinserve", "root": self.name,
                                            "max_model_len": self.backend.max_model_len}]}

    async def completions(self, request: Request):
        received = time.perf_counter()
        self.authorize(request)
        body = await self.read_body(request)
        self.engine.check_alive()

        def parsed():
            data = self.loads(body)
            self.check_token_prompts(data)
            req = parse(CompletionRequest, data)
            self.check_model(req)
            return req, self.params(req, DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens)

        def prepare():     # on a worker thread: parse, validate, tokenize
            req, gen = parsed()
            return req, gen, self.completion_prompts(req)
        # A small body is parsed on the loop (~0.2 us a token id), and token-id prompts are
        # checked there too: a hop to a worker thread costs more, waiting for the
        # interpreter lock while the loop streams chunks. Tokenizing text and large bodies
        # go to a worker: they never stall the loop.
        if len(body) > INLINE_BODY_BYTES:
            req, gen, prompts = await self.off_loop(prepare)
        else:
            req, gen = parsed()
            if isinstance(req.prompt, str) or any(isinstance(p, str) for p in req.prompt):
                prompts = await self.off_loop(self.completion_prompts, req)
            else:
                prompts = self.completion_prompts(req)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.name}
        if req.stream:
            queue, ids = await self.submit(prompts, gen, True, received)

            def choice(index, text, token_ids, finish_reason):
                return {"index": index, "text": text, "token_ids": token_ids, "logprobs": None,
                        "finish_reason": finish_reason}
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self.stream(queue, ids, base, choice, None, include_usage),
                                     media_type="text/event-stream")

        async def run():
            queue, ids = await self.submit(prompts, gen, False, received)
            outputs = await self.collect(queue, ids)
            for out in outputs:
                check_error(out)
            texts = [o.text for o in outputs]
            if None in texts:      # detokenize whole outputs off the loop
                texts = await self.off_loop(lambda: [self.backend.decode(o.token_ids) for o in outputs])
            choices = [{"index": i, "text": t, "token_ids": o.token_ids, "logprobs": None,
                        "finish_reason": o.finish_reason}
                       for i, (o, t) in enumerate(zip(outputs, texts))]
            return base | {"choices": choices, "usage": usage(outputs)}
        return await until_disconnect(request, run())

    async def chat_completions(self, request: Request):
        received = time.perf_counter()
        self.authorize(request)
        body = await self.read_body(request)
        self.engine.check_alive()

        def prepare():     # on a worker thread: parse, validate, tokenize
            req = parse(ChatRequest, self.loads(body))
            self.check_model(req)
            token_ids = self.chat_prompt(req)
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            if max_tokens is None:
                max_tokens = max(1, self.backend.max_model_len - len(token_ids))
            return req, self.params(req, max_tokens), token_ids
        req, gen, token_ids = await self.off_loop(prepare)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name}
        if req.stream:
            queue, ids = await self.submit([token_ids], gen, True, received)

            def choice(index, text, token_ids, finish_reason):
                return {"index": index, "delta": {"content": text} if text else {},
                        "token_ids": token_ids, "logprobs": None, "finish_reason": finish_reason}
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(self.stream(queue, ids, base, choice, first, include_usage),
                                     media_type="text/event-stream")

        async def run():
            queue, ids = await self.submit([token_ids], gen, False, received)
            (out,) = await self.collect(queue, ids)
            check_error(out)
            text = out.text if out.text is not None else await self.off_loop(self.backend.decode, out.token_ids)
            return base | {"object": "chat.completion",
                           "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                        "token_ids": out.token_ids, "logprobs": None,
                                        "finish_reason": out.finish_reason}],
                           "usage": usage([out])}
        return await until_disconnect(request, run())


async def until_disconnect(request: Request, coro):
    """Run `coro`; if the client disconnects first, cancel it (which aborts its requests) and
    answer nothing."""
    task = asyncio.ensure_future(coro)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()            # aborts its requests (collect's finally)
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)    # nobody is listening
    return task.result()
