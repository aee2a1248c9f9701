"""The official `openai` client, sync and async, streaming and not, against a real socket:
the engine backend (a tiny CPU model with a word-level tokenizer and chat template) and
the simulated backend (qwen3-0.6b on an H200, paced in real time)."""
import asyncio

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402
from server import EngineBackend, build_app  # noqa: E402
from server.sim import SimBackend  # noqa: E402
from server.thread import serving  # noqa: E402
from test_serve import CPU, write_tokenizer  # noqa: E402

KEY = "sk-test"


@pytest.fixture(scope="module")
def engine_url(tmp_path_factory):
    path = write_random_checkpoint(tiny_config("qwen3"), tmp_path_factory.mktemp("oa") / "tiny",
                                   dtype="float32", std=0.3)
    write_tokenizer(path)
    with serving(build_app(EngineBackend(str(path), **CPU), api_key=KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def sim_url():
    backend = SimBackend("qwen3-0.6b", "h200", num_gpu_blocks=256, max_model_len=512)
    with serving(build_app(backend, api_key=KEY)) as url:
        yield url


def clients(url):
    return (openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0),
            openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0))


@pytest.mark.parametrize("which", ["engine", "sim"])
def test_sync_and_async_streaming_and_not(which, request):
    url = request.getfixturevalue(f"{which}_url")
    sync, aio = clients(url)
    (model,) = [m.id for m in sync.models.list()]
    assert model == ("tiny" if which == "engine" else "qwen3-0.6b")
    extra = {"ignore_eos": True}
    prompt = "w10 w11 w12"

    full = sync.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                   extra_body=extra)
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 6
    chunks = list(sync.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                          stream=True, stream_options={"include_usage": True},
                                          extra_body=extra))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens

    chat = sync.chat.completions.create(model=model, messages=[{"role": "user", "content": "w50 w51"}],
                                        max_tokens=5, temperature=0, extra_body=extra)
    assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens == 5

    async def run_async():
        one = await aio.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "w50 w51"}], max_tokens=5,
            temperature=0, extra_body=extra)
        stream = await aio.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "w50 w51"}], max_tokens=5,
            temperature=0, stream=True, extra_body=extra)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        many = await asyncio.gather(*[aio.completions.create(
            model=model, prompt=[7, 8, 9 + i], max_tokens=4, extra_body=extra) for i in range(8)])
        await aio.close()
        return one, "".join(parts), many
    one, streamed, many = asyncio.run(run_async())
    assert one.choices[0].message.content == chat.choices[0].message.content == streamed
    assert all(m.usage.completion_tokens == 4 for m in many)


@pytest.mark.parametrize("which", ["engine", "sim"])
def test_errors_through_the_client(which, request):
    url = request.getfixturevalue(f"{which}_url")
    sync, _ = clients(url)
    model = "tiny" if which == "engine" else "qwen3-0.6b"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        sync.completions.create(model="nope", prompt="w1", max_tokens=2)
    for bad, field in ((dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                       (dict(max_tokens=0), "max_tokens"), (dict(presence_penalty=0.5), "presence_penalty"),
                       (dict(n=2), "n"), (dict(extra_body={"response_format": {"type": "json_object"}}),
                                          "response_format")):
        kwargs = {"max_tokens": 2} | bad
        with pytest.raises(openai.BadRequestError, match=field):
            sync.completions.create(model=model, prompt="w1 w2", **kwargs)
    with pytest.raises(openai.BadRequestError, match="tools"):
        sync.chat.completions.create(model=model, messages=[{"role": "user", "content": "w1"}],
                                     tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        sync.chat.completions.create(model=model, messages=[])
    # the server still serves
    assert sync.completions.create(model=model, prompt="w1 w2", max_tokens=2).usage.completion_tokens >= 1
