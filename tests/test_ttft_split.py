"""benchmarks/fidelity/ttft_split.py: a request's TTFT cut at the step loop's events, its parts
adding up to the TTFT, and a simulated run's TTFT error split into the parts' differences."""
import bench_scripts
from pathlib import Path

import pandas as pd
import pytest

ttft_split = bench_scripts.load("benchmarks/fidelity/ttft_split.py")


def write_run(d: Path, host: float, device: float, queue: float, prompt_tokens=None) -> Path:
    """Two requests: r0's prompt in one step, r1's cut over two steps; times in seconds;
    `prompt_tokens`: the three steps' num_prefill_tokens (none recorded without)."""
    d.mkdir(parents=True)
    steps, t = [], 0.0
    for k in range(3):      # step k formed at t, launched after `host`, tokens after the device
        start = t + queue
        launch = start + host
        steps.append({"step": k, "start_s": start, "launch_s": launch, "device_s": device,
                      "tokens_s": launch + device + 1e-4,
                      **({"num_prefill_tokens": prompt_tokens[k]} if prompt_tokens else {})})
        t = launch + device + 1e-4
    pd.DataFrame(steps).to_parquet(d / "steps.parquet")
    pd.DataFrame([
        {"request_id": "r0", "arrival_s": 0.0, "first_scheduled_s": steps[0]["start_s"], "first_token_s": steps[0]["tokens_s"]},
        {"request_id": "r1", "arrival_s": 0.0, "first_scheduled_s": steps[1]["start_s"], "first_token_s": steps[2]["tokens_s"]},
    ]).to_parquet(d / "requests.parquet")
    return d


def test_the_parts_add_up_to_each_requests_ttft(tmp_path):
    parts = ttft_split.split(write_run(tmp_path / "real", host=2e-3, device=20e-3, queue=1e-3))
    total = parts[list(ttft_split.COMPONENTS)].sum(axis=1)
    assert total.tolist() == pytest.approx(parts["ttft"].tolist())
    r0, r1 = parts.iloc[0], parts.iloc[1]
    assert r0["earlier_chunks"] == 0 and r1["earlier_chunks"] > 0     # r1's first chunk ran a step before
    assert r0["host_window"] == pytest.approx(2e-3) and r0["device"] == pytest.approx(20e-3)


def test_the_ttft_error_is_split_into_the_parts_differences(tmp_path, capsys):
    real = [write_run(tmp_path / f"r{k}", host=3e-3, device=20e-3, queue=1e-3) for k in range(2)]
    sim = write_run(tmp_path / "sim", host=1e-3, device=19e-3, queue=1e-3)
    r = ttft_split.compare(real, sim)
    assert sum(r[c]["share"] for c in ttft_split.COMPONENTS) == pytest.approx(r["error"])
    assert r["host_window"]["share"] < 0 and r["device"]["share"] < 0
    assert r["host_window"]["real_ms"] == pytest.approx(3.0) and r["host_window"]["sim_ms"] == pytest.approx(1.0)
    ttft_split.main([str(p) for p in real] + ["--sim", str(sim)])
    assert '"error"' in capsys.readouterr().out.splitlines()[-1]


def test_a_directory_without_a_run_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="ttft_split: .*requests.parquet"):
        ttft_split.main([str(tmp_path), "--sim", str(tmp_path)])


def with_prompt_lens(d: Path, lens: list[int]) -> Path:
    requests = pd.read_parquet(d / "requests.parquet")
    requests.assign(prompt_len=lens).to_parquet(d / "requests.parquet")
    return d


def test_the_error_is_split_by_prompt_length(tmp_path, capsys):
    real = [with_prompt_lens(write_run(tmp_path / f"r{k}", host=3e-3, device=20e-3, queue=1e-3), [100, 5000])
            for k in range(2)]
    sim = with_prompt_lens(write_run(tmp_path / "sim", host=1e-3, device=19e-3, queue=1e-3), [100, 5000])
    bins = ttft_split.by_prompt_len(real, sim, bins=2)
    assert bins["n"].tolist() == [1, 1] and bins["prompt_len"].tolist()[0].startswith("100")
    for b in bins.itertuples():     # each bin's parts add up to its TTFT difference
        assert sum(getattr(b, c) for c in ttft_split.COMPONENTS) == pytest.approx(b.ttft_sim_ms - b.ttft_real_ms)
    assert bins["host_window"].tolist() == pytest.approx([-2.0, -2.0])
    ttft_split.main([str(p) for p in real] + ["--sim", str(sim), "--by", "prompt_len", "--bins", "2"])
    out = capsys.readouterr().out
    assert "by prompt length" in out and '"by_prompt_len"' in out.splitlines()[-1]


def test_splitting_by_prompt_length_needs_the_lengths(tmp_path):
    real = write_run(tmp_path / "r0", host=3e-3, device=20e-3, queue=1e-3)
    with pytest.raises(SystemExit, match="ttft_split: .*no prompt_len"):
        ttft_split.main([str(real), "--sim", str(real), "--by", "prompt_len"])


def test_the_error_over_requests_whose_first_step_matches(tmp_path, capsys):
    # r1's first-token step holds another prompt's tokens too in the sim (2,000 more), and takes
    # longer: the error over the requests whose first steps match is r0's alone
    real = [write_run(tmp_path / f"r{k}", host=3e-3, device=20e-3, queue=1e-3, prompt_tokens=[100, 50, 50])
            for k in range(2)]
    sim = write_run(tmp_path / "sim", host=3e-3, device=22e-3, queue=1e-3, prompt_tokens=[100, 50, 2050])
    same = ttft_split.same_first_step(real, sim)
    assert same["requests"] == 1 and same["of"] == 2
    r0_real = ttft_split.split(real[0]).iloc[0]["ttft"]
    r0_sim = ttft_split.split(sim).iloc[0]["ttft"]
    assert same["error"] == pytest.approx(r0_sim / r0_real - 1)
    ttft_split.main([str(p) for p in real] + ["--sim", str(sim)])
    assert '"same_first_step"' in capsys.readouterr().out.splitlines()[-1]
    # runs recorded without the prompt tokens: nothing to match
    bare = [write_run(tmp_path / "bare", host=3e-3, device=20e-3, queue=1e-3)]
    assert ttft_split.same_first_step(bare, write_run(tmp_path / "bare_sim", host=1e-3, device=19e-3, queue=1e-3)) is None
