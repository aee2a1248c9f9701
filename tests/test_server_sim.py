"""The simulated backend: `--backend sim` options, the fitted cost model from a calibration
file, real-time pacing by the cost model's step times (a request alone takes at least the
sum of its steps' predicted times), true token counts with placeholder text, and the
same policy (prefix caching) as the engine."""
import httpx
import pytest

pytest.importorskip("fastapi")

from server import build_app  # noqa: E402
from server.cli import make_backend, parse_args  # noqa: E402
from server.sim import PLACEHOLDER_TEXT, SimBackend  # noqa: E402
from server.thread import serving  # noqa: E402


def test_sim_options(fitted_calibration):
    CALIBRATION = fitted_calibration
    args = parse_args(["--backend", "sim", "--model", "qwen3-0.6b", "--hardware", "h100",
                       "--cost-model", "fitted", "--calibration", CALIBRATION,
                       "--max-model-len", "2048", "--num-gpu-blocks-override", "100",
                       "--block-size", "32", "--no-enable-prefix-caching"])
    backend = make_backend(args)
    assert isinstance(backend, SimBackend) and backend.max_model_len == 2048
    bm = backend.scheduler.block_manager
    assert (bm.num_blocks, bm.block_size, bm.enable_prefix_caching) == (100, 32, False)
    for argv, message in (
            (["--backend", "sim", "--model", "qwen3-0.6b"], "needs --hardware"),
            (["--backend", "sim", "--model", "qwen3-0.6b", "--hardware", "h200", "--dtype", "float16"],
             "--dtype"),
            (["--model", "/m", "--hardware", "h200"], "--hardware"),
            (["--backend", "sim", "--model", "qwen3-0.6b", "--hardware", "h200",
              "--cost-model", "fitted"], "--calibration")):
        with pytest.raises(SystemExit):
            parse_args(argv)
    with pytest.raises(ValueError, match="unknown hardware"):
        make_backend(parse_args(["--backend", "sim", "--model", "qwen3-0.6b", "--hardware", "tpu"]))
    with pytest.raises(ValueError, match="calibrated for model"):
        make_backend(parse_args(["--backend", "sim", "--model", "qwen3-8b", "--hardware", "h100",
                                 "--cost-model", "fitted", "--calibration", CALIBRATION]))


def test_paced_by_the_cost_model():
    backend = SimBackend("qwen3-8b", "h100", num_gpu_blocks=256, max_model_len=1024)
    predicted = []
    step_time = backend.step_time
    backend.step_time = lambda batch: predicted.append(step_time(batch)) or predicted[-1]
    with serving(build_app(backend)) as url:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "a prompt of some bytes",
                                                      "max_tokens": 50}, timeout=30)
        elapsed = r.elapsed.total_seconds()
        out = r.json()
        assert out["usage"]["prompt_tokens"] == 6            # 22 bytes, 4 per token
        assert out["usage"]["completion_tokens"] == 50
        assert out["choices"][0]["text"] == PLACEHOLDER_TEXT * 50
        assert out["choices"][0]["finish_reason"] == "length"
        assert len(predicted) == 50 and elapsed >= sum(predicted)
        assert elapsed < sum(predicted) + 5.0
        # the same policy: a repeated prompt hits the prefix cache
        prompt = list(range(100, 164))
        first = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()
        again = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1}).json()
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 48   # 3 full blocks, never the last token
