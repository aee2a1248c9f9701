"""An OpenAI-compatible HTTP server over LLMEngine.

    python -m engine.serve --model /tmp/ckpt --port 8000 [--max-model-len 4096 ...]

Endpoints: POST /v1/completions and /v1/chat/completions (with "stream": true they answer
with server-sent events ending in `data: [DONE]`), GET /v1/models, GET /health.
Prompts are text or token ids; text and chat need the checkpoint's tokenizer (chat also its
chat template). Extensions to the OpenAI fields, as in vLLM: top_k, ignore_eos, and
`token_ids` in every choice (the only output of a model without tokenizer).

Concurrency: every call into the engine (add, step, abort) runs on ONE engine thread, so
the policy is never touched by two threads; an asyncio task keeps that thread stepping
while HTTP requests wait on their own queues. A stream whose client goes away is aborted.
"""
import argparse
import asyncio
import dataclasses
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from engine.config import EngineConfig
from engine.engine import PLACEHOLDER, LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

MAX_STEP_RECORDS = 100_000   # steps of the engine log the server keeps (a ~1 KB dict each)


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---- request bodies (OpenAI fields we honour; unsupported ones are rejected) --------------

class SamplingFields(BaseModel):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    ignore_eos: bool = False
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: bool | int | None = None
    stream: bool = False
    stream_options: dict | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


# ---- the engine thread --------------------------------------------------------------------

class AsyncEngine:
    """Runs an LLMEngine on one thread and fans its tokens out to asyncio queues.

    Each queue receives (index, token_ids) as tokens appear (streamed requests only), then
    (index, RequestOutput) when that request finishes, or (index, exception) if the engine
    fails."""

    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.streams: dict[str, tuple[asyncio.Queue, int]] = {}   # request id -> (queue, index)
        self.sent: dict[str, int] = {}        # streamed request id -> output tokens published
        self.wakeup: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.error: Exception | None = None    # set if a step failed: the engine is dead

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.thread, fn, *args)

    def start(self) -> None:
        self.wakeup = asyncio.Event()
        self.task = asyncio.create_task(self.run())

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass
        self.thread.shutdown(wait=True)

    async def add(self, token_ids: list[int], params: SamplingParams, queue: asyncio.Queue,
                  index: int, stream: bool) -> str:
        """Queue a request; its output goes to `queue` (token deltas too if `stream`)."""
        if self.error is not None:
            raise ApiError(f"the engine failed: {self.error!r}", 500)
        request_id = f"req-{uuid.uuid4().hex}"
        self.streams[request_id] = (queue, index)
        try:
            await self.call(self._add, request_id, token_ids, params, stream)
        except Exception:
            del self.streams[request_id]
            raise
        self.wakeup.set()
        return request_id

    def _add(self, request_id, token_ids, params, stream) -> None:
        self.engine.add_request(token_ids, params, request_id=request_id)
        if stream:
            self.sent[request_id] = 0

    def abort(self, request_ids: list[str]) -> None:
        """Stop publishing to these requests and abort them on the engine thread. Not a
        coroutine on purpose: it runs in `finally` blocks of cancelled tasks, where an
        await would be cancelled too."""
        for request_id in request_ids:
            self.streams.pop(request_id, None)
        if request_ids:
            self.thread.submit(self._abort, request_ids)

    def _abort(self, request_ids) -> None:
        for request_id in request_ids:
            self.sent.pop(request_id, None)
            self.engine.abort(request_id)

    def _step(self) -> tuple[dict[str, list[int]], list[RequestOutput]]:
        """On the engine thread: one step, plus the new tokens of every streamed request."""
        finished = self.engine.step()
        records = self.engine.step_records
        if len(records) > 2 * MAX_STEP_RECORDS:   # a server runs for days: keep the recent steps
            del records[:-MAX_STEP_RECORDS]
        fresh = {}
        for request_id, num_sent in self.sent.items():
            seq = self.engine.sequences.get(request_id)
            if seq is None:
                continue
            # async scheduling: the newest token may still be on its way (a placeholder)
            known = seq.num_output_tokens - (seq.token_ids[-1] == PLACEHOLDER)
            if known > num_sent:
                fresh[request_id] = seq.output_token_ids[num_sent:known]
                self.sent[request_id] = known
        for out in finished:
            num_sent = self.sent.pop(out.request_id, None)
            if num_sent is not None and len(out.token_ids) > num_sent:
                fresh[out.request_id] = out.token_ids[num_sent:]
        return fresh, finished

    async def run(self) -> None:
        while True:
            if not self.engine.has_unfinished():
                self.wakeup.clear()
                await self.wakeup.wait()
                continue
            try:
                fresh, finished = await self.call(self._step)
            except Exception as e:    # fail every waiting request, then refuse new ones
                self.error = e
                for queue, index in self.streams.values():
                    queue.put_nowait((index, e))
                self.streams.clear()
                return
            for request_id, token_ids in fresh.items():
                if request_id in self.streams:
                    queue, index = self.streams[request_id]
                    queue.put_nowait((index, token_ids))
            for out in finished:
                if out.request_id in self.streams:
                    queue, index = self.streams.pop(out.request_id)
                    queue.put_nowait((index, out))


# ---- helpers ------------------------------------------------------------------------------

def sampling_params(req: SamplingFields, max_tokens: int | None, default_max: int) -> SamplingParams:
    if req.n != 1:
        raise ApiError(f"n={req.n} is not supported (only n=1)")
    if req.stop:
        raise ApiError("stop sequences are not supported")
    if req.logprobs:
        raise ApiError("logprobs are not supported")
    try:
        return SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                              max_tokens=default_max if max_tokens is None else max_tokens,
                              ignore_eos=req.ignore_eos, seed=req.seed)
    except ValueError as e:
        raise ApiError(str(e)) from None


class Detokenizer:
    """Text deltas of a growing token list. A trailing U+FFFD (a character split across
    tokens) is held back until the next token completes it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.token_ids, self.text = tokenizer, [], ""

    def add(self, token_ids: list[int]) -> str:
        self.token_ids += token_ids
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        delta, self.text = text[len(self.text):], text
        return delta

    def finish(self) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        delta, self.text = text[len(self.text):], text
        return delta


def usage(outputs: list[RequestOutput]) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def error_response(message: str, status: int) -> JSONResponse:
    kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status)


# ---- the app ------------------------------------------------------------------------------

def build_app(engine: LLMEngine, model_name: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name` (default: its model path)."""
    name = model_name or engine.config.model
    tokenizer = engine.tokenizer
    max_model_len = engine.config.max_model_len
    async_engine = AsyncEngine(engine)

    @asynccontextmanager
    async def lifespan(app):
        async_engine.start()
        yield
        await async_engine.stop()

    app = FastAPI(title="twinserve", lifespan=lifespan)
    app.state.engine = async_engine

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return error_response(str(e), e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, e: RequestValidationError):
        return error_response(f"invalid request: {e.errors()}", 400)

    def check_model(req: SamplingFields) -> None:
        if req.model is not None and req.model != name:
            raise ApiError(f"the model {req.model!r} does not exist; this server serves {name!r}", 404)

    def tokenize(prompt: str | list[int]) -> list[int]:
        try:
            return engine.tokenize(prompt)
        except ValueError as e:
            raise ApiError(str(e)) from None

    async def submit(prompts: list[list[int]], params: SamplingParams, stream: bool):
        queue = asyncio.Queue()
        request_ids = []
        try:
            for index, token_ids in enumerate(prompts):
                request_ids.append(await async_engine.add(token_ids, params, queue, index, stream))
        except ValueError as e:
            async_engine.abort(request_ids)
            raise ApiError(str(e)) from None
        return queue, request_ids

    async def collect(queue, request_ids) -> list[RequestOutput]:
        outputs = [None] * len(request_ids)
        try:
            while any(o is None for o in outputs):
                index, item = await queue.get()
                if isinstance(item, Exception):
                    raise ApiError(f"the engine failed: {item!r}", 500)
                if isinstance(item, RequestOutput):
                    outputs[index] = item
        except asyncio.CancelledError:
            async_engine.abort(request_ids)
            raise
        return outputs

    async def stream(queue, request_ids, base: dict, make_choice, first_choice=None,
                     include_usage=False):
        """SSE events: base | {"choices": [...]} for an optional first choice, then one per
        delta (make_choice(index, text, token_ids, finish_reason)), an optional usage
        chunk, then [DONE]. Aborts the requests if the client goes away first."""
        detoks = [Detokenizer(tokenizer) for _ in request_ids]
        outputs = [None] * len(request_ids)
        try:
            if first_choice is not None:
                yield sse(base | {"choices": [first_choice]})
            while any(o is None for o in outputs):
                index, item = await queue.get()
                if isinstance(item, Exception):
                    yield sse({"error": {"message": f"the engine failed: {item!r}",
                                         "type": "InternalServerError", "code": 500}})
                    return
                if isinstance(item, RequestOutput):
                    outputs[index] = item
                    choice = make_choice(index, detoks[index].finish(), [], item.finish_reason)
                else:
                    choice = make_choice(index, detoks[index].add(item), item, None)
                yield sse(base | {"choices": [choice]})
            if include_usage:
                yield sse(base | {"choices": [], "usage": usage(outputs)})
            yield sse("[DONE]")
        finally:
            unfinished = [r for r, o in zip(request_ids, outputs) if o is None]
            if unfinished:
                async_engine.abort(unfinished)

    @app.get("/health")
    async def health():
        if async_engine.error is not None:
            return error_response(f"the engine failed: {async_engine.error!r}", 500)
        return {}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                            "owned_by": "twinserve", "max_model_len": max_model_len}]}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        check_model(req)
        if req.echo:
            raise ApiError("echo is not supported")
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise ApiError("prompt is empty")
        prompts = [tokenize(p) for p in prompt]
        params = sampling_params(req, req.max_tokens, 16)
        queue, request_ids = await submit(prompts, params, req.stream)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": name}
        if req.stream:
            def choice(index, text, token_ids, finish_reason):
                return {"index": index, "text": text, "token_ids": token_ids, "logprobs": None,
                        "finish_reason": finish_reason}
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(queue, request_ids, base, choice, None, include_usage),
                                     media_type="text/event-stream")
        outputs = await collect(queue, request_ids)
        choices = [{"index": i, "text": o.text or "", "token_ids": o.token_ids,
                    "logprobs": None, "finish_reason": o.finish_reason}
                   for i, o in enumerate(outputs)]
        return base | {"choices": choices, "usage": usage(outputs)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        check_model(req)
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise ApiError(f"the model {name!r} has no tokenizer chat template: chat is "
                           "unavailable; use /v1/completions")
        messages = [m.model_dump() for m in req.messages]
        token_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                       tokenize=True, return_dict=False))
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = sampling_params(req, max_tokens, max(1, max_model_len - len(token_ids)))
        queue, request_ids = await submit([token_ids], params, req.stream)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": name}

            def choice(index, text, token_ids, finish_reason):
                return {"index": index, "delta": {"content": text} if text else {},
                        "token_ids": token_ids, "logprobs": None, "finish_reason": finish_reason}
            first = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None}
            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(queue, request_ids, base, choice, first, include_usage),
                                     media_type="text/event-stream")
        (out,) = await collect(queue, request_ids)
        message = {"role": "assistant", "content": out.text or ""}
        return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": message, "token_ids": out.token_ids,
                             "logprobs": None, "finish_reason": out.finish_reason}],
                "usage": usage([out])}

    return app


# ---- command line -------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """--model, --host, --port, --served-model-name, and one flag per EngineConfig field
    (--max-model-len, --block-size, --enforce-eager/--no-enforce-eager, ...)."""
    parser = argparse.ArgumentParser(description="OpenAI-compatible server for twinserve")
    parser.add_argument("--model", required=True, help="local Hugging Face model directory")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None)
    for field in dataclasses.fields(EngineConfig):
        if field.name == "model":
            continue
        flag = "--" + field.name.replace("_", "-")
        if isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default)
        else:
            kind = int if field.default is None else type(field.default)
            parser.add_argument(flag, type=kind, default=field.default)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = vars(parse_args(argv))
    host, port, served = args.pop("host"), args.pop("port"), args.pop("served_model_name")
    engine = LLMEngine(args.pop("model"), **args)
    uvicorn.run(build_app(engine, served), host=host, port=port)


if __name__ == "__main__":
    main()
