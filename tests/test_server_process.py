"""The engine in a process of its own (the server's default): the same answers as the
engine in-process, requests checked before they are sent (400 at once), a stream that
hangs up is aborted in the engine, /metrics from the engine's stats, and a dead engine
process turns into 500 then 503, never a hang."""
import os
import signal

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402
from server import build_app  # noqa: E402
from server.cli import make_backend, parse_args  # noqa: E402
from server.process import BackendProcess, engine_process  # noqa: E402
from server.thread import serving  # noqa: E402
from test_serve import CPU, write_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    path = write_random_checkpoint(tiny_config("qwen3"), tmp_path_factory.mktemp("p") / "tiny",
                                   dtype="float32", std=0.3)
    write_tokenizer(path)
    return str(path)


def test_engine_process_serves_like_the_engine(path):
    backend = make_backend(parse_args(["--model", path, "--device", "cpu", "--dtype", "float32",
                                       "--attention-backend", "torch", "--max-model-len", "128",
                                       "--num-gpu-blocks-override", "128"]))
    assert isinstance(backend, BackendProcess)
    expected = LLM(path, **CPU).generate([[10, 11, 12]], SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    with serving(build_app(backend, "tiny")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        out = client.completions.create(model="tiny", prompt=[10, 11, 12], max_tokens=8,
                                        temperature=0, extra_body={"ignore_eos": True})
        assert out.choices[0].text == expected.text
        chunks = list(client.completions.create(model="tiny", prompt="w10 w11 w12", max_tokens=8,
                                                temperature=0, stream=True,
                                                extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks) == expected.text
        with pytest.raises(openai.BadRequestError, match="max_model_len"):
            client.completions.create(model="tiny", prompt=[1, 2], max_tokens=500)
        with pytest.raises(openai.BadRequestError, match="top_p"):
            client.completions.create(model="tiny", prompt=[1, 2], top_p=2.0)
        # a stream that hangs up is aborted in the engine process
        body = {"prompt": [5, 6, 7], "max_tokens": 100, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data: {"))
        client.completions.create(model="tiny", prompt=[1, 2], max_tokens=1)   # after the abort
        # the prefix cache, and POST /reset_prefix_cache emptying it in the engine process
        cached = lambda: client.completions.create(
            model="tiny", prompt=list(range(20, 60)), max_tokens=1).usage.prompt_tokens_details.cached_tokens
        assert (cached(), cached()) == (0, 32)
        assert httpx.post(f"{url}/reset_prefix_cache").status_code == 200
        assert cached() == 0
        metrics = httpx.get(f"{url}/metrics").text
        assert 'vllm:num_requests_running{model_name="tiny"} 0.0' in metrics
        assert 'vllm:kv_cache_usage_perc{model_name="tiny"} 0.0' in metrics
        assert 'vllm:generation_tokens_total{model_name="tiny"} 20.0' in metrics   # 8 + 8 + 1 + 3
        # the engine process dies: the waiting request fails, then the server says it is down
        os.kill(backend.process.pid, signal.SIGKILL)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 2}, timeout=60)
        assert r.status_code == 500 and "backend process died" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/health").status_code == 503


def test_bad_engine_options_fail_before_a_process_starts(path):
    with pytest.raises(ValueError, match="dtype"):
        engine_process(path, device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="room for"):     # the engine's own error, from the process
        engine_process(path, **(CPU | dict(num_gpu_blocks=2, max_model_len=128)))
