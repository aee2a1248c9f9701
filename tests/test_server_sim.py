"""The simulated backend: `--backend sim` options, the fitted cost model from a calibration
file, real-time pacing by the cost model's step times (a request alone takes at least the
sum of its steps' predicted times), true token counts with placeholder text, and the
same policy (prefix caching) as the engine."""
import json
import os

import httpx
import pandas as pd
import pytest

pytest.importorskip("fastapi")

from server import build_app  # noqa: E402
from server.cli import make_backend, parse_args  # noqa: E402
from server.process import BackendProcess  # noqa: E402
from server.backend import GenerationParams  # noqa: E402
from server.sim import PLACEHOLDER_TEXT, SimBackend  # noqa: E402
from server.thread import serving  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> str:
    """A fitted calibration of qwen3-0.6b on the h100 (a roofline's profile stands in for
    the engine's: the format and the checks are what matter here)."""
    from policy import SchedulerConfig
    from server.sim import model_hf_config, read_conf
    from simulator import CudaGraphs, HardwareSpec, ModelSpec, RooflineCostModel
    from simulator.calibrate import fit_calibration
    from simulator.profile_grid import profile_grid, shape_batch
    sched = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=2048)
    graphs = CudaGraphs.for_engine(sched.max_num_seqs, sched.max_num_batched_tokens, 256)
    spec = ModelSpec.from_hf_config(model_hf_config(read_conf("model", "qwen3-0.6b"), "q"),
                                    name="qwen3-0.6b")
    roofline = RooflineCostModel(spec, HardwareSpec(**read_conf("hardware", "h100")), graphs=graphs)
    rows = []
    for point in profile_grid(sched.max_num_seqs, sched.max_num_batched_tokens, sched.max_model_len, graphs):
        f = shape_batch(point["shape"], 16, 4000).features()
        kind, padded = graphs.rows(f)
        rows.append({**f, "kind": kind, "rows": padded, "split": point["split"],
                     "device_s": roofline.predict(f), "host_launch_s": 2e-4, "host_receive_s": 5e-5})
    calib = fit_calibration(pd.DataFrame(rows), {"model": "qwen3-0.6b", "device": "h100 (roofline "
                                                 "stand-in)", "command": "tests/test_server_sim.py"})
    path = tmp_path_factory.mktemp("calib") / "qwen3-0.6b-h100.json"
    path.write_text(json.dumps(calib))
    return str(path)


def test_sim_options(calibration):
    argv = ["--backend", "sim", "--model", "qwen3-0.6b", "--hardware", "h100",
            "--cost-model", "fitted", "--calibration", calibration, "--max-model-len", "2048",
            "--num-gpu-blocks-override", "100", "--block-size", "32", "--no-enable-prefix-caching"]
    backend = make_backend(parse_args(argv + ["--engine-in-process"]))
    assert isinstance(backend, SimBackend) and backend.max_model_len == 2048
    bm = backend.scheduler.block_manager
    assert (bm.num_blocks, bm.block_size, bm.enable_prefix_caching) == (100, 32, False)
    backend = make_backend(parse_args(argv))          # the default: a process of its own
    try:
        assert isinstance(backend, BackendProcess) and backend.max_model_len == 2048
        bm = backend.probe.block_manager              # the server's copy of the policy config
        assert (bm.num_blocks, bm.block_size, bm.enable_prefix_caching) == (100, 32, False)
    finally:
        backend.close()
    assert backend.process.exitcode == 0
    for argv, message in (
            (["--backend", "sim", "--model", "qwen3-0.6b"], "needs --hardware"),
            (["--backend", "sim", "--model", "qwen3-0.6b", "--hardware", "h200", "--dtype", "float16"],
             "--dtype"),
            (["--model", "/m", "--hardware", "h200"], "--hardware"),
            (["--backend", "sim", "--model", "qwen3-0.6b", "--hardware", "h200",
              "--cost-model", "fitted"], "--calibration")):
        with pytest.raises(SystemExit):
            parse_args(argv)
    with pytest.raises(ValueError, match="unknown hardware"):     # from the backend process
        make_backend(parse_args(["--backend", "sim", "--model", "qwen3-0.6b", "--hardware", "tpu"]))
    with pytest.raises(ValueError, match="calibrated for model"):
        make_backend(parse_args(["--backend", "sim", "--model", "qwen3-8b", "--hardware", "h100",
                                 "--cost-model", "fitted", "--calibration", calibration,
                                 "--engine-in-process"]))


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_paced_by_the_cost_model(async_scheduling):
    backend = SimBackend("qwen3-8b", "h100", num_gpu_blocks=256, max_model_len=1024,
                         async_scheduling=async_scheduling)
    predicted = []     # the device time of every step the twin runs
    cost = backend.executor.cost
    predict = cost.predict
    cost.predict = lambda features: predicted.append(predict(features)) or predicted[-1]
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


def test_shipped_calibration_drives_the_twin_through_a_reset():
    """The shipped H200 calibration prices decode attention by the engine's split-KV plan
    (decode_span_tokens): the twin's scheduler must record it on every step, also after a
    prefix-cache reset rebuilds the policy (the H200 run found the backend dying on the first
    request with a KeyError)."""
    path = os.path.join(ROOT, "simulator", "calibrations", "qwen3-0.6b-h200-tp1.json")
    backend = SimBackend("qwen3-0.6b", "h200", cost_model="fitted", calibration=path,
                         num_gpu_blocks=256, max_model_len=1024)
    assert backend.executor.cost.decode_plan is not None
    with serving(build_app(backend)) as url:
        for _ in range(2):
            r = httpx.post(f"{url}/v1/completions", json={"prompt": list(range(40)), "max_tokens": 8},
                           timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
            assert httpx.post(f"{url}/reset_prefix_cache", timeout=30).status_code == 200


def test_disconnects_mid_stream_leave_the_twin_serving():
    """Streams that hang up while their step is in flight (async scheduling): every abort
    frees its blocks, the twin keeps serving, the rest complete."""
    import asyncio

    backend = SimBackend("qwen3-8b", "h100", num_gpu_blocks=512, max_model_len=1024)

    async def one(client, url, i):
        body = {"prompt": f"request {i} " * 8, "max_tokens": 40, "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = 0
            async for line in r.aiter_lines():
                lines += line.startswith("data: ")
                if i % 2 and lines == 1 + i % 5:      # hang up after a few chunks
                    return None
            return lines

    async def run(url):
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*[one(client, url, i) for i in range(40)])

    with serving(build_app(backend)) as url:
        results = asyncio.run(run(url))
        assert httpx.get(f"{url}/health").status_code == 200
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "after", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert [n for n in results[::2]] == [42] * 20, results    # 40 tokens, the finish, [DONE]
    assert not backend.has_unfinished() and not backend.sequences and not backend.salt
    bm = backend.scheduler.block_manager
    assert bm.num_free_blocks == bm.num_blocks


def test_a_request_joins_the_turn_after_its_arrival_not_after_the_pipe():
    """The twin admits a request at the first turn formed after its arrival, as the offline
    simulator does, when the arrival is the server's stamp: a request that reached the
    server during a turn (and waited in the pipe while the twin slept) joins the next turn;
    stamped only when the twin reads it, it would lose a whole turn."""
    backend = SimBackend("qwen3-0.6b", "h200", num_gpu_blocks=256, max_model_len=1024)
    backend.add("long", list(range(1, 200)), GenerationParams(max_tokens=50))
    for _ in range(5):
        backend.step()
    turn_end = backend.executor.t            # the twin slept until here (wall ~ twin clock)
    backend.add("in-time", list(range(300, 340)), GenerationParams(max_tokens=2),
                arrival_time=backend.epoch + turn_end - 1e-4)   # arrived during the last turn
    backend.add("late", list(range(400, 440)), GenerationParams(max_tokens=2))   # stamped now
    backend.step()
    on_time, late = backend.sequences["in-time"], backend.sequences["late"]
    assert on_time.arrival_time < turn_end < late.arrival_time
    assert on_time.first_scheduled_time == turn_end       # the very next turn
    assert late.first_scheduled_time is None               # waits for its arrival to pass
    while backend.has_unfinished():
        backend.step()
    assert late.first_scheduled_time > turn_end


def test_reset_prefix_cache_over_http():
    """POST /reset_prefix_cache empties the twin's prefix cache (a repeated prompt finds
    nothing cached), in its own process and in the server's; 409 while a request runs."""
    import asyncio

    from server.process import sim_process
    prompt = list(range(100, 164))
    for backend in (SimBackend("qwen3-0.6b", "h200", num_gpu_blocks=256, max_model_len=1024),
                    sim_process("qwen3-0.6b", "h200", num_gpu_blocks=256, max_model_len=1024)):
        with serving(build_app(backend)) as url:
            def cached():
                r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 1})
                return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert (cached(), cached()) == (0, 48)
            assert httpx.post(f"{url}/reset_prefix_cache").status_code == 200
            assert (cached(), cached()) == (0, 48)

            async def while_running():
                async with httpx.AsyncClient(timeout=60) as client:
                    body = {"prompt": [7] * 20, "max_tokens": 200, "stream": True}
                    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("data: {"):
                                return await client.post(f"{url}/reset_prefix_cache")
            r = asyncio.run(while_running())
            assert r.status_code == 409 and r.json()["error"]["code"] == 409
            assert httpx.post(f"{url}/reset_prefix_cache").status_code == 200   # the stream's
            assert cached() == 0                                # abort is stepped out first
    with serving(build_app(SimBackend("qwen3-0.6b", "h200", num_gpu_blocks=64, max_model_len=256),
                           api_key="k")) as url:
        assert httpx.post(f"{url}/reset_prefix_cache").status_code == 401
        assert httpx.post(f"{url}/reset_prefix_cache", headers={"Authorization": "Bearer k"}).status_code == 200


def test_the_twin_hands_each_turn_on_when_its_clock_says_it_ended():
    """The twin computes a turn at once and hands its tokens on at the turn's end on its
    clock (`step_due`; the message is built before): never earlier (the twin would run
    faster than the GPU it simulates), and how late each turn left is in /metrics
    (twinserve:pacing_lateness_seconds), in its own process and in the server's."""
    import time

    from prometheus_client.parser import text_string_to_metric_families

    from server.process import sim_process
    backend = sim_process("qwen3-8b", "h100", num_gpu_blocks=256, max_model_len=1024)
    try:
        backend.add("r", list(range(1, 100)), GenerationParams(max_tokens=30))
        finished, turns = [], 0
        while not finished:
            finished = backend.step()
            received = time.perf_counter()      # CLOCK_MONOTONIC: one clock for both processes
            turns += 1
        (f,) = finished
        assert len(f.token_times) == 30 and received >= f.token_times[-1]
        late = backend.take_lateness()     # each turn's, with the message after it (a step()
        assert len(late) >= turns - 1 and min(late) >= 0         # may take several)
        assert backend.take_lateness() == []
    finally:
        backend.close()

    def paced_turns(url) -> float:
        text = httpx.get(f"{url}/metrics").text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == "twinserve:pacing_lateness_seconds_count")
    for backend in (SimBackend("qwen3-8b", "h100", num_gpu_blocks=256, max_model_len=1024),
                    sim_process("qwen3-8b", "h100", num_gpu_blocks=256, max_model_len=1024)):
        with serving(build_app(backend)) as url:
            r = httpx.post(f"{url}/v1/completions", json={"prompt": [5] * 40, "max_tokens": 12}, timeout=30)
            assert r.status_code == 200
            assert paced_turns(url) >= 12
