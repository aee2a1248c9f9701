"""The OpenAI-compatible server (server/) on a tiny CPU model, through FastAPI's TestClient:
text and token-id prompts, chat through the tokenizer's chat template, streaming, errors."""
import json

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402
from server import EngineBackend, build_app  # noqa: E402
from server.cli import parse_args  # noqa: E402
from server.thread import serving  # noqa: E402

CPU = dict(device="cpu", dtype="float32", attention_backend="torch", num_gpu_blocks=128,
           max_model_len=128)
WORDS = ["<unk>", "<s>", "</s>", "system", "user", "assistant", ":"] + [f"w{i}" for i in range(7, 512)]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")


def write_tokenizer(path):
    """A word-level tokenizer over the tiny vocabulary ("w7" -> id 7), with a chat template."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    bare = write_random_checkpoint(tiny_config("qwen3"), root / "bare", dtype="float32", std=0.3)
    chat = write_random_checkpoint(tiny_config("qwen3"), root / "chat", dtype="float32", std=0.3)
    write_tokenizer(chat)
    return {"bare": str(bare), "chat": str(chat)}


@pytest.fixture(scope="module")
def client(paths):
    with TestClient(build_app(EngineBackend(paths["chat"], **CPU), "tiny")) as client:
        yield client


@pytest.fixture(scope="module")
def bare_client(paths):
    with TestClient(build_app(EngineBackend(paths["bare"], **CPU))) as client:
        yield client


def events(response):
    """The JSON payloads of an SSE response, and whether it ended with [DONE]."""
    data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"], data[-1] == "[DONE]"


def test_health_and_models(client, bare_client):
    assert client.get("/health").status_code == 200
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    # the default model id is the directory's name, not the server's absolute path
    assert [m["id"] for m in bare_client.get("/v1/models").json()["data"]] == ["bare"]


def test_completion_text_matches_offline_generate(client, paths):
    body = {"model": "tiny", "prompt": "w10 w11 w12 w13", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    (choice,) = out["choices"]
    expected = LLM(paths["chat"], **CPU).generate(
        [[10, 11, 12, 13]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        use_tqdm=False)[0]
    assert choice["token_ids"] == expected.token_ids
    assert choice["text"] == expected.text
    assert choice["finish_reason"] == "length"
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12,
                            "prompt_tokens_details": {"cached_tokens": 0}}


def test_completion_batch_of_token_id_prompts(client):
    body = {"prompt": [[20, 21, 22], [30, 31]], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True}
    out = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert all(len(c["token_ids"]) == 5 for c in out["choices"])
    assert out["usage"]["prompt_tokens"] == 5


def test_completion_stream(client):
    body = {"prompt": [40, 41, 42], "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        chunks, done = events(r)
    assert done
    *deltas, usage = chunks
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 6
    assert deltas[-1]["choices"][0]["finish_reason"] == "length"
    streamed = [t for c in deltas for t in c["choices"][0]["token_ids"]]
    full = client.post("/v1/completions", json={**body, "stream": False}).json()
    assert streamed == full["choices"][0]["token_ids"]
    assert "".join(c["choices"][0]["text"] for c in deltas) == full["choices"][0]["text"]


def test_chat_and_chat_stream(client):
    body = {"messages": [{"role": "user", "content": "w50 w51"}], "max_tokens": 4,
            "temperature": 0, "ignore_eos": True}
    out = client.post("/v1/chat/completions", json=body).json()
    (choice,) = out["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["token_ids"]) == 4
    assert out["usage"]["prompt_tokens"] == len("user : w50 w51 assistant :".split())
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        chunks, done = events(r)
    assert done and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"]


def test_errors_are_400_with_a_message(client, bare_client):
    r = bare_client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]
    r = bare_client.post("/v1/completions", json={"prompt": "w10 w11"})
    assert r.status_code == 400 and "tokenizer" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 500})
    assert r.status_code == 400 and "max_model_len" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"prompt": [1, 2], "n": 2})
    assert r.status_code == 400
    r = client.post("/v1/completions", json={"prompt": [1, 2], "top_p": 0})
    assert r.status_code == 400 and "top_p" in r.json()["error"]["message"]
    r = client.post("/v1/completions", json={"model": "other", "prompt": [1, 2]})
    assert r.status_code == 404
    assert client.post("/v1/completions", json={"max_tokens": 3}).status_code == 400


def test_bare_model_serves_token_ids(bare_client):
    out = bare_client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 3,
                                                    "ignore_eos": True}).json()
    assert len(out["choices"][0]["token_ids"]) == 3 and out["choices"][0]["text"] == ""


def test_cli_flags_cover_engine_config():
    args = parse_args(["--model", "/m", "--max-model-len", "256", "--enforce-eager",
                       "--no-enable-prefix-caching", "--num-gpu-blocks-override", "64",
                       "--no-async-scheduling"])
    assert (args.max_model_len, args.enforce_eager, args.enable_prefix_caching,
            args.num_gpu_blocks_override, args.async_scheduling) == (256, True, False, 64, False)
    with pytest.raises(SystemExit):
        parse_args(["--model", "/m", "--async-scheduling", "0"])   # a flag, not a value


def test_fatal_engine_failure_is_500_then_503(paths):
    """A step that raises out of the engine (the engine ends a failed step's requests
    itself; this is the last resort) fails the waiting requests and marks the server down."""
    backend = EngineBackend(paths["bare"], **CPU)

    def broken_step():
        raise RuntimeError("device lost")
    backend.step = broken_step
    with TestClient(build_app(backend)) as client:
        r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2})
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        r = client.post("/v1/completions", json={"prompt": [5, 6]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"


def test_client_disconnect_aborts_the_stream(paths):
    """A real uvicorn server: a streaming client that hangs up mid-answer frees its request
    (the engine stops stepping it long before its max_tokens)."""
    import httpx
    import time

    backend = EngineBackend(paths["bare"], **CPU)
    engine = backend.engine
    with serving(build_app(backend)) as url:
        body = {"prompt": [5, 6, 7], "max_tokens": 120, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))
        deadline = time.monotonic() + 60
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.has_unfinished()
        assert len(engine.step_records) < 100      # aborted, not run to max_tokens
        bm = engine.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks


def test_server_bounds_the_step_log(paths, monkeypatch):
    """A long-running server keeps only the recent steps of the engine's log."""
    monkeypatch.setattr(EngineBackend, "MAX_STEP_RECORDS", 4)
    backend = EngineBackend(paths["bare"], **CPU)
    with TestClient(build_app(backend)) as client:
        r = client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 20, "ignore_eos": True})
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 20
    assert 0 < len(backend.engine.step_records) <= 8


def test_the_engine_server_logs_its_stalls_at_each_reset(paths, capsys):
    """At every prefix-cache reset (a benchmark run's start) and at close the engine's
    server writes its stall log to stderr: the steps since the last log and the slowest of
    them with their shapes (on the CPU no Triton kernel compiles: no census)."""
    backend = EngineBackend(paths["bare"], **CPU)
    with TestClient(build_app(backend)) as client:
        r = client.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 6, "ignore_eos": True})
        assert r.status_code == 200
        steps = len(backend.engine.step_records)
        capsys.readouterr()
        assert client.post("/reset_prefix_cache").status_code == 200
        lines = capsys.readouterr().err.splitlines()
        assert lines[0].startswith(f"stalls before prefix-cache reset 1: {steps} steps, 0 kernel")
        slow = lines[1:]
        assert len(slow) == min(5, steps) and all(s.startswith("  slow step") for s in slow)
        assert all("num_seqs=1" in s for s in slow)
        assert client.post("/reset_prefix_cache").status_code == 200      # no step since
        assert "stalls" not in capsys.readouterr().err
        client.post("/v1/completions", json={"prompt": [5, 6], "max_tokens": 2, "ignore_eos": True})
    assert "stalls at close: " in capsys.readouterr().err
