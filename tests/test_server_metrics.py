"""/metrics, parsed with prometheus_client's own parser, against the requests sent: vLLM's
metric names and types, token counters equal to the usage the client got, one histogram
sample per request (per gap for inter-token latency), gauges back to 0 when idle."""
import json

import httpx
import pytest

pytest.importorskip("fastapi")
parser = pytest.importorskip("prometheus_client.parser")

from engine.checkpoint import tiny_config, write_random_checkpoint  # noqa: E402
from server import EngineBackend, build_app  # noqa: E402
from server.sim import SimBackend  # noqa: E402
from server.thread import serving  # noqa: E402
from test_serve import CPU  # noqa: E402

TYPES = {"vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
         "vllm:kv_cache_usage_perc": "gauge", "vllm:prefix_cache_queries": "counter",
         "vllm:prefix_cache_hits": "counter", "vllm:num_preemptions": "counter",
         "vllm:prompt_tokens": "counter", "vllm:generation_tokens": "counter",
         "vllm:request_success": "counter", "vllm:time_to_first_token_seconds": "histogram",
         "vllm:inter_token_latency_seconds": "histogram",
         "vllm:e2e_request_latency_seconds": "histogram",
         "vllm:request_queue_time_seconds": "histogram"}


def scrape(url) -> dict:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in parser.text_string_to_metric_families(r.text)}


def value(families, name, suffix="", **labels) -> float:
    return sum(s.value for s in families[name].samples
               if s.name == name + suffix and labels.items() <= s.labels.items())


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    path = write_random_checkpoint(tiny_config("qwen3"), tmp_path_factory.mktemp("m") / "tiny",
                                   dtype="float32", std=0.3)
    return {"engine": lambda: EngineBackend(str(path), **(CPU | dict(num_gpu_blocks=64)), block_size=4),
            "sim": lambda: SimBackend("qwen3-0.6b", "h200", num_gpu_blocks=64, block_size=4,
                                      max_model_len=128)}


@pytest.mark.parametrize("which", ["engine", "sim"])
def test_metrics_match_the_requests_sent(backends, which):
    shared = list(range(20, 36))     # 16 tokens: four full blocks the second request can reuse
    prompts = [shared + [40], shared + [41], [50, 51, 52], [60] * 9]
    max_tokens = [5, 1, 7, 3]
    with serving(build_app(backends[which](), "m")) as url:
        before = scrape(url)
        assert {name: before[name].type for name in TYPES} == TYPES
        usages = []
        for prompt, n in zip(prompts, max_tokens):
            body = {"prompt": prompt, "max_tokens": n, "ignore_eos": True, "stream": n % 2 == 1,
                    "stream_options": {"include_usage": True}}
            if body["stream"]:
                with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                    lines = [l[6:] for l in r.iter_lines() if l.startswith("data: {")]
                    usages.append(json.loads(lines[-1])["usage"])
            else:
                usages.append(httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["usage"])
        httpx.post(f"{url}/v1/completions", json={"prompt": [1], "top_p": 7})   # refused: counts nowhere
        m = scrape(url)
    prompt_tokens = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert generated == sum(max_tokens) and prompt_tokens == sum(map(len, prompts))
    assert value(m, "vllm:prompt_tokens", "_total", model_name="m") == prompt_tokens
    assert value(m, "vllm:generation_tokens", "_total") == generated
    assert value(m, "vllm:request_success", "_total", finished_reason="length") == len(prompts)
    assert value(m, "vllm:prefix_cache_queries", "_total") == prompt_tokens
    assert value(m, "vllm:prefix_cache_hits", "_total") == cached == 16
    assert value(m, "vllm:num_preemptions", "_total") == 0
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert value(m, f"vllm:{name}_seconds", "_count") == len(prompts)
        assert value(m, f"vllm:{name}_seconds", "_sum") >= 0
    assert value(m, "vllm:inter_token_latency_seconds", "_count") == generated - len(prompts)
    assert value(m, "vllm:time_to_first_token_seconds", "_bucket", le="+Inf") == len(prompts)
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert value(m, f"vllm:{gauge}") == 0
