"""One bad request never stops the server: every error status has an OpenAI-style body,
parsing and tokenization never block the event loop, a client that leaves aborts its
request, overload is a 503, a failure inside a step ends only that step's requests."""
import json
import threading

import httpx
import pytest

pytest.importorskip("fastapi")

from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402
from server import EngineBackend, build_app  # noqa: E402
from server.sim import SimBackend  # noqa: E402
from server.thread import serving  # noqa: E402
from test_serve import CPU  # noqa: E402


def sim_backend(**kwargs):
    return SimBackend("qwen3-0.6b", "h200", num_gpu_blocks=256, max_model_len=4096, **kwargs)


def assert_openai_error(r: httpx.Response, status: int, *words):
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and isinstance(error["type"], str) and "param" in error
    for word in words:
        assert word in error["message"], error["message"]


@pytest.fixture(scope="module")
def url():
    with serving(build_app(sim_backend(), max_request_bytes=1 << 20)) as url:
        yield url


def test_every_error_status_is_openai_style(url):
    post = lambda body, **kw: httpx.post(f"{url}/v1/completions", content=body, timeout=30, **kw)
    assert_openai_error(post(b"{not json"), 400, "JSON")
    assert_openai_error(post(b'{"prompt": "\xff\xfe"}'), 400, "UTF-8")
    assert_openai_error(post(b"[" * 100_000 + b"]" * 100_000), 400)
    assert_openai_error(post(b'[1, 2]'), 400, "object")
    assert_openai_error(post(json.dumps({"prompt": "a\\ud800b"}).encode().replace(b"\\\\", b"\\")),
                        400, "Unicode")
    assert_openai_error(post(json.dumps({"prompt": "hi", "max_tokens": "many"}).encode()), 400, "max_tokens")
    assert_openai_error(post(json.dumps({"prompt": "hi", "foo": 1}).encode()), 400, "'foo'")
    assert_openai_error(post(json.dumps({"prompt": "hi", "max_tokens": 10**9}).encode()), 400,
                        "max_model_len")
    assert_openai_error(post(json.dumps({"prompt": [10**9]}).encode()), 400, "vocabulary")
    assert_openai_error(post(json.dumps({"prompt": "hi", "temperature": 1e400}).encode()
                             .replace(b"inf", b"1e400")), 400, "temperature")
    assert_openai_error(httpx.post(f"{url}/v1/chat/completions", json={"messages": []}), 400, "messages")
    assert_openai_error(httpx.get(f"{url}/v1/nothing"), 404)
    assert_openai_error(httpx.get(f"{url}/v1/completions"), 405)
    big = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    assert_openai_error(post(big), 413, "--max-request-bytes")
    chunked = httpx.post(f"{url}/v1/completions", content=iter([big[i:i + 65536]
                                                                for i in range(0, len(big), 65536)]))
    assert_openai_error(chunked, 413)                               # no Content-Length
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    nulls = {"temperature": None, "top_p": None, "top_k": None, "n": None, "stream": None,
             "stop": None, "presence_penalty": None, "user": None}   # null = unset, as OpenAI
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2} | nulls).status_code == 200


def test_tokenization_never_blocks_the_event_loop():
    """While one request's prompt is being tokenized (held here until /health answered),
    the server answers /health and serves another request."""
    backend = sim_backend()
    release, started = threading.Event(), threading.Event()
    tokenize = backend.tokenize

    def slow_tokenize(prompt):
        if prompt == "slow":
            started.set()
            assert release.wait(30)
        return tokenize(prompt)
    backend.tokenize = slow_tokenize
    with serving(build_app(backend)) as url, httpx.Client(timeout=30) as client:
        result = {}
        slow = threading.Thread(target=lambda: result.update(
            r=client.post(f"{url}/v1/completions", json={"prompt": "slow", "max_tokens": 2})))
        slow.start()
        assert started.wait(30)
        try:
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "fast", "max_tokens": 2}, timeout=5)
            assert r.status_code == 200
        finally:
            release.set()
            slow.join()
        assert result["r"].status_code == 200


def test_non_streaming_client_that_leaves_is_aborted():
    backend = sim_backend()
    aborted = []
    abort = backend.abort
    backend.abort = lambda request_id: aborted.append(abort(request_id)) or aborted[-1]
    with serving(build_app(backend)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 4000,
                                                      "ignore_eos": True}, timeout=0.5)
        with httpx.Client() as client:     # the engine thread has done the abort by now
            assert client.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                               timeout=30).status_code == 200
    assert aborted == [True]
    bm = backend.scheduler.block_manager
    assert not backend.has_unfinished() and bm.num_free_blocks == bm.num_blocks


def test_overload_is_503_then_serves_again():
    backend = sim_backend()
    with serving(build_app(backend, max_queued_requests=2)) as url:
        body = {"prompt": "hi", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as a, \
                httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as b:
            assert a.status_code == b.status_code == 200
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, timeout=30)
            assert_openai_error(r, 503, "overloaded")
            assert r.headers["retry-after"] == "1"
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200


def test_failed_step_fails_only_its_requests(tmp_path):
    path = write_random_checkpoint(tiny_config("qwen3"), tmp_path / "m", dtype="float32", std=0.3)
    backend = EngineBackend(str(path), **CPU, async_scheduling=False, max_num_seqs=1)
    runner = backend.engine.model_runner
    launch = runner.launch

    def poisoned_launch(batch, params, *args):
        if any(499 in seq.prompt_token_ids for seq in batch.seqs):
            raise RuntimeError("poisoned batch")
        return launch(batch, params, *args)
    runner.launch = poisoned_launch
    with serving(build_app(backend)) as url:
        poison = {"prompt": [1, 499], "max_tokens": 3, "ignore_eos": True}
        r = httpx.post(f"{url}/v1/completions", json=poison, timeout=30)
        assert_openai_error(r, 500, "poisoned batch")
        with httpx.stream("POST", f"{url}/v1/completions", json=poison | {"stream": True},
                          timeout=30) as s:
            lines = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert "poisoned batch" in json.loads(lines[-2][6:])["error"]["message"]
        assert lines[-1] == "data: [DONE]"
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": [1, 2], "max_tokens": 3,
                                                       "ignore_eos": True}, timeout=30)
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(f"{url}/health").status_code == 200
    bm = backend.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_huge_prompts_are_refused_without_tokenizing_them_whole():
    backend = sim_backend()
    backend.max_token_bytes = 1 << 20          # a tokenizer with very long tokens: no byte bound
    seen = []
    tokenize = backend.tokenize
    backend.tokenize = lambda prompt: seen.append(len(prompt)) or tokenize(prompt)
    with serving(build_app(backend)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 3_000_000}, timeout=30)
        assert_openai_error(r, 400, "max_model_len")
        assert max(seen) < 3_000_000 // 10       # only the head was tokenized
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [1] * 1_000_000}, timeout=30)
        assert_openai_error(r, 400, "1000000 token ids")
        r = httpx.post(f"{url}/v1/completions", json={"prompt": [[1, 2], [1] * 5000]}, timeout=30)
        assert_openai_error(r, 400, "5000 token ids")
        assert httpx.get(f"{url}/health").status_code == 200
