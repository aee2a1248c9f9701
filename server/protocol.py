"""Request bodies of the OpenAI API as this server accepts them.

Unknown fields are refused by name (a client that relies on one should hear it is not
honoured). OpenAI fields the server does not implement (penalties, logprobs, stop strings,
tools, response formats, n > 1, ...) are accepted only at their neutral value, which is
what many clients send by default, and refused by name otherwise. Extensions, as in vLLM:
top_k, ignore_eos, min_tokens=0, repetition_penalty=1, and `token_ids` in every choice.
"""
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from server.async_engine import ApiError

# field -> the values that mean "off"; anything else is refused with a 400 naming it
NEUTRAL = {"n": (None, 1), "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
           "repetition_penalty": (None, 1), "min_tokens": (None, 0), "logprobs": (None, False, 0),
           "top_logprobs": (None, 0), "stop": (None, "", []), "stop_token_ids": (None, []),
           "logit_bias": (None, {}), "suffix": (None, ""), "echo": (None, False),
           "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
           "function_call": (None, "none"), "response_format": (None, {"type": "text"}),
           "min_p": (None, 0), "prompt_logprobs": (None, 0)}


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def check_neutral(self) -> None:
        for name in sorted(self.model_fields_set & NEUTRAL.keys()):
            value = getattr(self, name)
            if value not in NEUTRAL[name]:
                raise ApiError(f"{name}={value!r} is not supported by this server", param=name)


class StreamOptions(Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(Body):
    model: str | None = None          # null means "unset" for every field, as OpenAI's API
    max_tokens: int | None = None
    temperature: float | None = None  # 1.0
    top_p: float | None = None        # 1.0
    top_k: int | None = None          # -1 (off)
    seed: int | None = None
    ignore_eos: bool | None = None    # False
    stream: bool | None = None        # False
    stream_options: StreamOptions | None = None
    user: str | None = None                      # accepted, unused
    parallel_tool_calls: bool | None = None      # accepted, unused (tools are refused)
    # OpenAI / vLLM fields accepted only when neutral (NEUTRAL)
    n: int | None = None
    best_of: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    min_p: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    top_logprobs: int | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None


def first_error(e: ValidationError) -> ApiError:
    """The first problem pydantic found, as a 400 naming the field."""
    err = e.errors()[0]
    loc = ".".join(str(part) for part in err["loc"]) or "body"
    if err["type"] == "extra_forbidden":
        return ApiError(f"unsupported field {loc!r}: this server does not implement it", param=loc)
    if err["type"] == "missing":
        return ApiError(f"{loc} is required", param=loc)
    return ApiError(f"{loc}: {err['msg']}", param=loc)


def parse(cls, data) -> BaseModel:
    if not isinstance(data, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        body = cls.model_validate(data)
    except ValidationError as e:
        raise first_error(e) from None
    body.check_neutral()
    return body
