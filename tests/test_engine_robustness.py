"""The engine stays up whatever one request does: a failure inside a step ends that step's
requests with an error and the engine serves the rest; abort either reports the request
gone or lets its output come; a request that stops on EOS while the next step is already
scheduled (asynchronous scheduling) is skipped by that step's update."""
import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from engine import LLM, LLMEngine, SamplingParams
from engine.checkpoint import tiny_config, write_random_checkpoint

CPU = dict(device="cpu", dtype="float32", attention_backend="torch")
PROMPT = [11, 12, 13]     # 3 tokens: the first decode step completes block 0 (block size 4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_random_checkpoint(tiny_config("qwen3"), tmp_path_factory.mktemp("ckpt") / "m",
                                       dtype="float32", seed=0, std=0.3))


def run_all(engine) -> dict:
    outputs = {}
    while engine.has_unfinished():
        outputs |= {o.request_id: o for o in engine.step()}
    return outputs


def assert_no_block_held(engine):
    bm = engine.scheduler.block_manager
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_eos_seen_a_step_late_with_block_size_4(checkpoint, tmp_path, prefix_caching):
    """The short prompt's first token is its EOS. With async scheduling the EOS is seen
    only after the next step (which completes block 0) was scheduled and launched; that
    step's update must skip the finished sequence (else it registers a block it freed)."""
    first = LLM(checkpoint, **CPU, num_gpu_blocks=32, max_model_len=64).generate(
        [PROMPT], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)[0].token_ids[0]
    path = tmp_path / "model"
    path.mkdir()
    for name in os.listdir(checkpoint):
        os.symlink(os.path.join(checkpoint, name), path / name)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": first}))
    engine = LLMEngine(str(path), **CPU, num_gpu_blocks=32, max_model_len=64, block_size=4,
                       async_scheduling=True, enable_prefix_caching=prefix_caching)
    a = engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=8))
    b = engine.add_request(PROMPT + [14, 15, 16], SamplingParams(temperature=0, max_tokens=6,
                                                                    ignore_eos=True))
    outputs = run_all(engine)
    assert outputs[a].finish_reason == "stop" and outputs[a].token_ids == [first]
    assert outputs[b].finish_reason == "length" and len(outputs[b].token_ids) == 6
    assert not any(o.error for o in outputs.values())
    assert_no_block_held(engine)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_failed_step_ends_its_requests_and_the_engine_keeps_serving(checkpoint, monkeypatch,
                                                                     async_scheduling):
    engine = LLMEngine(checkpoint, **CPU, num_gpu_blocks=64, max_model_len=64,
                       async_scheduling=async_scheduling)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    launch = engine.model_runner.launch

    def poisoned_launch(batch, params, *args):
        if any(seq.seq_id == "poison" for seq in batch.seqs):
            raise RuntimeError("boom")
        return launch(batch, params, *args)

    monkeypatch.setattr(engine.model_runner, "launch", poisoned_launch)
    engine.add_request(PROMPT, greedy, request_id="mate")
    engine.add_request(PROMPT + [20], greedy, request_id="poison")
    failed = run_all(engine)
    assert set(failed) == {"mate", "poison"}
    assert all(o.finish_reason == "error" and "boom" in o.error for o in failed.values())
    assert all(-1 not in o.token_ids for o in failed.values())
    assert_no_block_held(engine)
    # the engine still serves, and serves correctly
    after = engine.add_request(PROMPT, greedy, request_id="after")
    out = run_all(engine)[after]
    expected = LLM(checkpoint, **CPU, num_gpu_blocks=64, max_model_len=64).generate(
        [PROMPT], greedy, use_tqdm=False)[0]
    assert out.finish_reason == "length" and out.token_ids == expected.token_ids
    assert_no_block_held(engine)


def test_abort_reports_gone_or_delivers(checkpoint):
    """Abort every request at every point of its life: each one either comes back from a
    step (abort said False) or never does (abort said True), and no block stays held."""
    for async_scheduling in (True, False):
        engine = LLMEngine(checkpoint, **CPU, num_gpu_blocks=64, max_model_len=64,
                           async_scheduling=async_scheduling)
        params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        for delay in range(6):
            ids = [engine.add_request(PROMPT + [i], params) for i in range(3)]
            delivered = {}
            for _ in range(delay):
                delivered |= {o.request_id: o for o in engine.step()}
            gone = {i for i in ids if i not in delivered and engine.abort(i)}
            delivered |= run_all(engine)
            assert gone.isdisjoint(delivered)
            assert gone | set(delivered) == set(ids), (async_scheduling, delay)
            assert_no_block_held(engine)


def test_add_request_validation(checkpoint):
    engine = LLMEngine(checkpoint, **CPU, num_gpu_blocks=64, max_model_len=64)
    vocab = engine.model_config.vocab_size
    engine.add_request(PROMPT, SamplingParams(max_tokens=2), request_id="x")
    with pytest.raises(ValueError, match="already queued"):
        engine.add_request(PROMPT, SamplingParams(max_tokens=2), request_id="x")
    with pytest.raises(ValueError, match="SamplingParams"):
        engine.add_request(PROMPT, {"max_tokens": 2})
    # top_k beyond the vocabulary, batched with another top-k request: keeps every token
    engine.add_request(PROMPT, SamplingParams(top_k=vocab + 1000, max_tokens=4, seed=1))
    engine.add_request(PROMPT, SamplingParams(top_k=5, max_tokens=4, seed=2))
    outputs = run_all(engine)
    assert len(outputs) == 3 and not any(o.error for o in outputs.values())


def test_prompt_token_ids_in_any_integer_form(checkpoint):
    """A list, an int64 array("q") (what a replay passes) and a numpy array of the same ids
    queue the same prompt; anything not a flat sequence of in-vocabulary integers is
    refused in one line, naming the request, and queues nothing."""
    import numpy as np
    from array import array
    engine = LLMEngine(checkpoint, **CPU, num_gpu_blocks=64, max_model_len=64)
    vocab = engine.model_config.vocab_size
    forms = {"list": list(PROMPT), "array": array("q", PROMPT), "numpy": np.array(PROMPT, dtype=np.int32)}
    for name, prompt in forms.items():
        engine.add_request(prompt, SamplingParams(max_tokens=2, temperature=0), request_id=name)
        assert engine.sequences[name].prompt_token_ids == list(PROMPT)
    for bad, match in (([1.5, 2.0], "integers"), ([True, False], "integers"), ([[1, 2]], "flat"),
                       ([1, vocab], f"token id {vocab} is outside"), ([3, -1], "token id -1 is outside"),
                       ([1, 2 ** 70], "integers")):
        with pytest.raises(ValueError, match=match):
            engine.add_request(bad, SamplingParams(max_tokens=2), request_id="bad")
        assert "bad" not in engine.sequences
    outputs = run_all(engine)
    assert set(outputs) == set(forms)          # greedy: one prompt, one output
    assert len({tuple(o.token_ids) for o in outputs.values()}) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"), (dict(top_k=-2), "top_k"),
    (dict(top_k=1.5), "top_k"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=True), "max_tokens"),
    (dict(seed=-1), "seed"), (dict(ignore_eos="yes"), "ignore_eos")])
def test_sampling_params_refuse(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_tiny_temperature_is_greedy(checkpoint):
    """T < 1e-5 is greedy, as in vLLM (1e-38 used to overflow the logits)."""
    assert SamplingParams(temperature=1e-38).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    assert SamplingParams(top_k=0).top_k == -1
    llm = LLM(checkpoint, **CPU, num_gpu_blocks=64, max_model_len=64)
    tiny, greedy = llm.generate([PROMPT, PROMPT], [
        SamplingParams(temperature=1e-38, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)], use_tqdm=False)
    assert tiny.token_ids == greedy.token_ids


def listening_addresses(pids) -> list[str]:
    """Local addresses of the TCP sockets these processes listen on (from /proc)."""
    inodes = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:    # 0A = LISTEN
                    addresses.append(fields[1].split(":")[0])
    return addresses


@pytest.mark.distributed
@pytest.mark.skipif(not os.path.isdir("/proc/net"), reason="reads listening sockets from /proc")
def test_tensor_parallel_listens_on_loopback_only(checkpoint):
    loopback = {"0100007F", "00000000000000000000000001000000"}     # 127.0.0.1, ::1
    with LLM(checkpoint, **CPU, tensor_parallel_size=2, num_gpu_blocks=32, max_model_len=64) as llm:
        pids = [os.getpid()] + [p.pid for p in llm.workers.processes]
        addresses = listening_addresses(pids)
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True),
                           use_tqdm=False)
    assert len(out[0].token_ids) == 2
    assert addresses and set(addresses) <= loopback, addresses


def test_the_memory_report_accounts_for_every_byte_of_the_device():
    """ModelRunner.memory (CUDA): the device's bytes when the KV pool was sized, split into
    what torch holds, torch's cache, the rest the device reports used, the largest step's
    activations, the pool and what is left; on the CPU nothing is measured."""
    from engine.model_runner import memory_report
    gib = 1 << 30
    report = memory_report(total=141 * gib, free=120 * gib, allocated=16 * gib, reserved=17 * gib,
                           activation=3 * gib, kv=100 * gib, utilization=0.9)
    parts = ("weights", "torch_cache", "other", "activation", "kv", "unused")
    assert sum(report[k] for k in parts) == report["total"]
    assert report["weights"] == 16 * gib and report["torch_cache"] == gib and report["other"] == 4 * gib
    assert report["unused"] == 141 * gib - 21 * gib - 103 * gib


def test_a_cpu_runner_reports_no_device_memory(checkpoint):
    engine = LLMEngine(checkpoint, **CPU, num_gpu_blocks=32, max_model_len=64)
    assert engine.model_runner.memory == {} and engine.model_runner.num_blocks == 32
