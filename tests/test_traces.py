"""traces/: loaders on the shipped files, arrival processes, generators, materialize, and
every kind of bad input."""
import csv
import json
import math
from datetime import datetime

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st

from traces import TRACE_NAMES, Request, TraceConfig, TraceError, load_trace, materialize
from traces.synthetic import arrival_times

FILE_TRACES = ["sharegpt", "arxiv", "bwb", "azure_conv", "azure_code", "mooncake_conv",
               "mooncake_synthetic", "sharegpt_tokens"]
GENERATED = ["synthetic", "shared_prefix", "multi_turn"]
VOCAB = 151_936   # Qwen3's: holds the ids of both shipped token files


def check_canonical(df: pd.DataFrame) -> None:
    assert list(df.columns[:4]) == ["request_id", "arrival_s", "prompt_len", "output_len"]
    content = set(df.columns[4:]) - {"line"}
    assert content <= {"prompt_token_ids", "hash_ids"} and len(content) <= 1
    if "line" in df.columns:     # file traces: each row's line in the file, in file order
        assert df["line"].is_monotonic_increasing and (df["line"] >= 1).all()
    assert pd.api.types.is_string_dtype(df["request_id"]) and df["request_id"].is_unique
    assert df["arrival_s"].dtype == np.float64
    assert df["prompt_len"].dtype == np.int64 and df["output_len"].dtype == np.int64
    assert (df["prompt_len"] > 0).all() and (df["output_len"] > 0).all()
    assert df["arrival_s"].iloc[0] == 0.0 and df["arrival_s"].is_monotonic_increasing
    if "hash_ids" in df.columns:
        hbs = df.attrs["hash_block_size"]
        assert (df["hash_ids"].map(len) == -(-df["prompt_len"] // hbs)).all()
    if "prompt_token_ids" in df.columns:
        assert (df["prompt_token_ids"].map(len) == df["prompt_len"]).all()


def common_prefix(a, b) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


# ---------------------------------------------------------------- shipped files

@pytest.mark.parametrize("name", FILE_TRACES + GENERATED)
def test_every_trace_loads_canonical(name):
    df = load_trace(TraceConfig(name=name, num_requests=200))
    assert len(df) == 200
    check_canonical(df)
    requests = materialize(df, block_size=16, vocab_size=VOCAB, seed=0)
    assert [r.request_id for r in requests] == df["request_id"].tolist()
    assert [len(r.prompt_token_ids) for r in requests] == df["prompt_len"].tolist()
    assert all(0 <= min(r.prompt_token_ids) and max(r.prompt_token_ids) < VOCAB
               for r in requests)


@pytest.mark.parametrize("name", FILE_TRACES)
def test_full_files_load(name):
    df = load_trace(TraceConfig(name=name))
    check_canonical(df)
    assert len(df) >= 300


def test_relations_between_workloads():
    mean = {name: load_trace(TraceConfig(name=name))[["prompt_len", "output_len"]].mean()
            for name in ("arxiv", "bwb", "azure_code", "azure_conv", "mooncake_conv",
                         "sharegpt")}
    # summarization reads much more than it writes; translation writes about as much
    assert mean["arxiv"]["prompt_len"] > 5 * mean["arxiv"]["output_len"]
    assert mean["bwb"]["output_len"] > mean["bwb"]["prompt_len"]
    # code completion answers are far shorter than chat answers
    assert mean["azure_code"]["output_len"] < mean["azure_conv"]["output_len"] / 3
    # Mooncake's long-context chat has the longest prompts
    assert mean["mooncake_conv"]["prompt_len"] > 2 * mean["sharegpt"]["prompt_len"]


def test_azure_timestamps_match_an_independent_parse():
    from traces.load import trace_path
    cfg = TraceConfig(name="azure_conv")
    df = load_trace(cfg)
    with open(trace_path(cfg)) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(df)

    def seconds(stamp):   # strptime's %f takes 6 digits: add the 7-digit fraction by hand
        whole, frac = stamp.split(".")
        return datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp() + float("0." + frac)

    t0 = seconds(rows[0]["TIMESTAMP"])
    expected = np.array([seconds(r["TIMESTAMP"]) - t0 for r in rows])
    np.testing.assert_allclose(df["arrival_s"], expected, atol=1e-6)
    assert df["prompt_len"].tolist() == [int(r["ContextTokens"]) for r in rows]
    # about an hour of requests at a rate of a few per second (SOURCES.md: 5.53 req/s)
    duration = df["arrival_s"].iloc[-1]
    assert 3000 < duration <= 3600
    assert 5.0 < (len(df) - 1) / duration < 6.0


def test_mooncake_requests_share_real_prefixes():
    df = load_trace(TraceConfig(name="mooncake_conv", num_requests=300))
    first_blocks = df["hash_ids"].map(lambda ids: ids[0])
    assert first_blocks.value_counts().iloc[0] > 1   # the trace reuses prefixes
    requests = materialize(df, block_size=16, vocab_size=VOCAB, seed=0)
    block = {}   # hash id -> its 512 tokens, from every full block in the slice
    for row, req in zip(df.itertuples(), requests):
        for j, h in enumerate(row.hash_ids[:row.prompt_len // 512]):
            tokens = tuple(req.prompt_token_ids[j * 512:(j + 1) * 512])
            assert block.setdefault(h, tokens) == tokens
    assert len(set(block.values())) == len(block)   # different ids, different content


def test_sharegpt_tokens_keeps_the_real_ids():
    for tokenizer in ("qwen3", "llama"):
        cfg = TraceConfig(name="sharegpt_tokens", tokenizer=tokenizer, num_requests=20)
        df = load_trace(cfg)
        from traces.load import trace_path
        with open(trace_path(cfg)) as f:
            raw = [json.loads(next(f)) for _ in range(20)]
        requests = materialize(df, block_size=16, vocab_size=VOCAB, seed=3)
        assert [list(r.prompt_token_ids) for r in requests] == [r["input_tok_ids"] for r in raw]
        assert df["output_len"].tolist() == [r["output_toks"] for r in raw]
    small = max(max(ids) for ids in df["prompt_token_ids"])
    with pytest.raises(TraceError, match=r"sharegpt-llama.*\.jsonl, line \d+: token id \d+ is "
                       "outside the model's vocabulary"):
        materialize(df, block_size=16, vocab_size=small, seed=0)
    # a table without a source names the row
    with pytest.raises(TraceError, match=r"row \d+ \(request_id '\d+'\): token id"):
        materialize(df.drop(columns="line"), block_size=16, vocab_size=small, seed=0)


# ---------------------------------------------------------------- selection and timing

def test_filters_apply_before_first_n():
    bounds = dict(min_prompt_len=500, max_prompt_len=3000, min_output_len=50,
                  max_output_len=800, max_total_len=3200)
    full = load_trace(TraceConfig(name="sharegpt"))
    kept = full[(full.prompt_len >= 500) & (full.prompt_len <= 3000) & (full.output_len >= 50)
                & (full.output_len <= 800) & (full.prompt_len + full.output_len <= 3200)]
    df = load_trace(TraceConfig(name="sharegpt", num_requests=1000, **bounds))
    assert len(df) == 1000 and len(kept) > 1000
    assert df["request_id"].tolist() == kept["request_id"].head(1000).tolist()
    assert df["prompt_len"].tolist() == kept["prompt_len"].head(1000).tolist()


def test_num_requests_is_an_upper_bound():
    df = load_trace(TraceConfig(name="sharegpt_tokens", num_requests=10_000))
    assert len(df) == 300


def test_trace_arrivals_rebase_and_time_scale():
    base = load_trace(TraceConfig(name="azure_code", num_requests=500))
    fast = load_trace(TraceConfig(name="azure_code", num_requests=500, time_scale=0.5))
    np.testing.assert_allclose(fast["arrival_s"], 0.5 * base["arrival_s"])
    # after a filter drops the first rows, the first kept request still arrives at 0
    late = load_trace(TraceConfig(name="azure_code", num_requests=100, min_prompt_len=5000))
    assert late["request_id"].iloc[0] != "0" and late["arrival_s"].iloc[0] == 0.0


def test_timestamped_traces_can_use_a_process_instead():
    df = load_trace(TraceConfig(name="mooncake_conv", arrival="burst", num_requests=50))
    assert (df["arrival_s"] == 0).all()
    df = load_trace(TraceConfig(name="azure_conv", arrival="constant", request_rate=4.0,
                                num_requests=50))
    np.testing.assert_allclose(np.diff(df["arrival_s"]), 0.25)


def test_length_only_traces_default_to_poisson_at_request_rate():
    df = load_trace(TraceConfig(name="bwb", request_rate=20.0))
    gaps = np.diff(df["arrival_s"])
    assert abs(gaps.mean() * 20.0 - 1) < 0.03
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05


@settings(max_examples=15)
@given(rate=st.floats(0.1, 100), seed=st.integers(0, 2**32))
def test_poisson_gaps(rate, seed):
    times = arrival_times("poisson", 20_001, rate, 1.0, np.random.default_rng(seed))
    gaps = np.diff(times)
    assert times[0] == 0 and (gaps >= 0).all()
    assert abs(gaps.mean() * rate - 1) < 0.04          # ~5 standard errors
    assert abs(gaps.std() / gaps.mean() - 1) < 0.05


@settings(max_examples=15)
@given(cv=st.sampled_from([0.25, 0.5, 2.0, 4.0]), rate=st.floats(0.5, 50),
       seed=st.integers(0, 2**32))
def test_gamma_gaps_have_the_requested_cv(cv, rate, seed):
    gaps = np.diff(arrival_times("gamma", 100_001, rate, cv, np.random.default_rng(seed)))
    assert abs(gaps.mean() * rate - 1) < 0.05 * max(cv, 1)
    assert abs(gaps.std() / gaps.mean() / cv - 1) < 0.12


@pytest.mark.parametrize("name", ["azure_conv", "sharegpt"] + GENERATED)
def test_deterministic_under_seed(name):
    cfg = dict(name=name, num_requests=300, length_dist="lognormal", arrival="gamma", cv=2.0)
    a, b = load_trace(TraceConfig(**cfg, seed=7)), load_trace(TraceConfig(**cfg, seed=7))
    pd.testing.assert_frame_equal(a, b)
    other = load_trace(TraceConfig(**cfg, seed=8))
    assert not np.array_equal(a["arrival_s"], other["arrival_s"])
    ra = materialize(a, block_size=16, vocab_size=1000, seed=1)
    assert ra == materialize(b, block_size=16, vocab_size=1000, seed=1)
    rb = materialize(a, block_size=16, vocab_size=1000, seed=2)
    assert all(x.prompt_token_ids != y.prompt_token_ids for x, y in zip(ra, rb))


# ---------------------------------------------------------------- generators

def test_length_distributions():
    fixed = load_trace(TraceConfig(name="synthetic", prompt_len=300, output_len=40))
    assert (fixed["prompt_len"] == 300).all() and (fixed["output_len"] == 40).all()
    uniform = load_trace(TraceConfig(name="synthetic", num_requests=5000, length_dist="uniform",
                                     prompt_len_range=[10, 20], output_len_range=[1, 3]))
    assert set(uniform["prompt_len"]) == set(range(10, 21))
    assert set(uniform["output_len"]) == {1, 2, 3}
    logn = load_trace(TraceConfig(name="synthetic", num_requests=20_000, length_dist="lognormal",
                                  prompt_len=1000, output_len=200, length_cv=0.5))
    assert abs(logn["prompt_len"].mean() / 1000 - 1) < 0.03
    assert abs(logn["prompt_len"].std() / logn["prompt_len"].mean() / 0.5 - 1) < 0.06
    clipped = load_trace(TraceConfig(name="synthetic", length_dist="lognormal", length_cv=3.0,
                                     prompt_len_range=[100, 400]))
    assert clipped["prompt_len"].between(100, 400).all()


@pytest.mark.parametrize("prefix_len", [512, 100, 37])
def test_shared_prefix_groups_share_exactly_the_system_prompt(prefix_len):
    df = load_trace(TraceConfig(name="shared_prefix", num_requests=60, num_prefixes=4,
                                prefix_len=prefix_len, length_dist="uniform",
                                prompt_len_range=[8, 300], output_len_range=[1, 10]))
    requests = materialize(df, block_size=16, vocab_size=50_000, seed=0)
    groups = {}
    for r in requests:
        groups.setdefault(r.request_id.split("-")[0], []).append(r.prompt_token_ids)
    assert 1 < len(groups) <= 4
    for members in groups.values():
        for p in members[1:]:   # the system prompt, then own text (8+ tokens: no chance match)
            assert common_prefix(members[0], p) == prefix_len
    heads = [tuple(members[0][:prefix_len]) for members in groups.values()]
    assert len(set(heads)) == len(heads)


def test_multi_turn_prompt_contains_previous_turn_and_output():
    df = load_trace(TraceConfig(name="multi_turn", num_requests=40, num_turns=4,
                                prefix_len=64, length_dist="uniform",
                                prompt_len_range=[5, 200], output_len_range=[5, 200]))
    requests = {r.request_id: (i, r) for i, r in
                enumerate(materialize(df, block_size=16, vocab_size=50_000, seed=0))}
    pairs = 0
    for rid, (i, req) in requests.items():
        conv, turn = rid.split("-turn")
        nxt = requests.get(f"{conv}-turn{int(turn) + 1}")
        if nxt is None:
            continue
        j, later = nxt
        assert j > i and later.arrival_s >= req.arrival_s
        prompt, next_prompt = req.prompt_token_ids, later.prompt_token_ids
        assert next_prompt[:len(prompt)] == prompt
        # then this turn's output and at least one token of new user text
        assert len(next_prompt) > len(prompt) + req.output_len
        pairs += 1
    assert pairs == 30   # 10 conversations x 3 follow-up turns


# ---------------------------------------------------------------- materialize

@settings(max_examples=60)
@given(hbs=st.integers(1, 64), shared=st.integers(0, 6), tails=st.tuples(
    st.integers(1, 5), st.integers(1, 5)), cut=st.integers(0, 63),
    block_size=st.sampled_from([1, 16, 32, 64]), seed=st.integers(0, 100))
def test_equal_hash_ids_give_equal_tokens(hbs, shared, tails, cut, block_size, seed):
    prefix = list(range(shared))
    ids = [prefix + list(range(100 + 10 * k, 100 + 10 * k + n)) for k, n in enumerate(tails)]
    # the second prompt ends inside its last block: it is truncated there
    lens = [len(ids[0]) * hbs, len(ids[1]) * hbs - min(cut, hbs - 1)]
    df = pd.DataFrame({"request_id": ["a", "b"], "arrival_s": [0.0, 0.0],
                       "prompt_len": lens, "output_len": [1, 1], "hash_ids": ids})
    df.attrs["hash_block_size"] = hbs
    a, b = materialize(df, block_size=block_size, vocab_size=50_000, seed=seed)
    assert len(a.prompt_token_ids) == lens[0] and len(b.prompt_token_ids) == lens[1]
    assert a.prompt_token_ids[:shared * hbs] == b.prompt_token_ids[:shared * hbs]
    n = min(lens[1] - shared * hbs, hbs)
    if n >= 4:   # the first own block differs (4+ random tokens cannot all collide)
        assert a.prompt_token_ids[shared * hbs:][:n] != b.prompt_token_ids[shared * hbs:][:n]
    # a partial block is the start of the same full block
    full = pd.DataFrame({"request_id": ["c"], "arrival_s": [0.0], "prompt_len": [hbs],
                         "output_len": [1], "hash_ids": [[ids[1][-1]]]})
    full.attrs["hash_block_size"] = hbs
    (c,) = materialize(full, block_size=block_size, vocab_size=50_000, seed=seed)
    tail = lens[1] - (len(ids[1]) - 1) * hbs
    assert b.prompt_token_ids[-tail:] == c.prompt_token_ids[:tail]


def test_materialize_rows_without_content_are_random_and_stable():
    df = load_trace(TraceConfig(name="sharegpt", num_requests=50))
    requests = materialize(df, block_size=16, vocab_size=32_000, seed=0)
    assert all(isinstance(r, Request) for r in requests)
    assert len({tuple(r.prompt_token_ids[:8]) for r in requests}) == len(requests)
    # a row's tokens depend on its request_id, not on which rows are around it
    again = materialize(df.iloc[10:20], block_size=16, vocab_size=32_000, seed=0)
    assert again == requests[10:20]
    tokens = np.concatenate([r.prompt_token_ids for r in requests])
    assert tokens.min() >= 0 and tokens.max() < 32_000
    assert len(np.unique(tokens)) > 0.9 * 32_000 * (1 - math.exp(-len(tokens) / 32_000))


def test_materialize_rejects_inconsistent_rows():
    df = pd.DataFrame({"request_id": ["x"], "arrival_s": [0.0], "prompt_len": [1000],
                       "output_len": [5], "hash_ids": [[1, 2, 3]]})
    with pytest.raises(TraceError, match=r"row 0 \(request_id 'x'\): 3 hash_ids"):
        materialize(df, block_size=16, vocab_size=1000, seed=0)
    df = pd.DataFrame({"request_id": ["y"], "arrival_s": [0.0], "prompt_len": [3],
                       "output_len": [5], "prompt_token_ids": [[1, 2]]})
    with pytest.raises(TraceError, match="2 prompt_token_ids but prompt_len 3"):
        materialize(df, block_size=16, vocab_size=1000, seed=0)
    with pytest.raises(TraceError, match="vocab_size"):
        materialize(df, block_size=16, vocab_size=0, seed=0)
    with pytest.raises(TraceError, match="block_size"):
        materialize(df, block_size=0, vocab_size=100, seed=0)


# ---------------------------------------------------------------- bad input

VIDUR_HEADER = "num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
AZ = "2023-11-16 18:15:4{}.6805900"


def mooncake(ts, n, out, ids):
    return json.dumps({"timestamp": ts, "input_length": n, "output_length": out,
                       "hash_ids": ids}) + "\n"


def servingsim(ns, ids, out):
    return json.dumps({"input_toks": len(ids), "output_toks": out, "arrival_time_ns": ns,
                       "input_tok_ids": ids, "output_tok_ids": [1] * out}) + "\n"


BAD_FILES = [
    ("sharegpt", ".csv", VIDUR_HEADER + "10,5,15,2\n10,5,15,2,9\n", 3, "5 fields, expected 4"),
    ("sharegpt", ".csv", VIDUR_HEADER + "10,5,15,2\n10,5\n", 3, "num_total_tokens is missing"),
    ("arxiv", ".csv", VIDUR_HEADER + "10,5,15,2\n-4,5,1,2\n", 3, "num_prefill_tokens"),
    ("arxiv", ".csv", VIDUR_HEADER + "10,0,10,2\n", 2, "num_decode_tokens"),
    ("bwb", ".csv", VIDUR_HEADER + "10,5,15,2\n10,abc,15,2\n", 3, "num_decode_tokens"),
    ("bwb", ".csv", VIDUR_HEADER + "10,5,15,2\n10.5,5,15.5,2\n", 3, "positive integer"),
    # a blank line is skipped but still counted
    ("bwb", ".csv", VIDUR_HEADER + "10,5,15,2\n\n10,5,x,2\n", 4, "num_total_tokens"),
    ("sharegpt", ".csv", VIDUR_HEADER + "10,5,15,2\n10,5,16,2\n", 3, "is not"),
    ("sharegpt", ".csv", "num_prefill_tokens,num_total_tokens\n10,15\n", 1, "missing column"),
    ("azure_conv", ".csv", AZURE_HEADER + f"{AZ.format(1)},10,5\n2023-11-16 18:15,10,5\n", 3,
     "TIMESTAMP"),
    ("azure_conv", ".csv", AZURE_HEADER + f"{AZ.format(1)},10,5\n{AZ.format(5)},10,5\n"
     f"{AZ.format(3)},10,5\n", 4, "back in time"),
    ("azure_code", ".csv", AZURE_HEADER + f"{AZ.format(1)},10,5\n{AZ.format(2)},10,0\n", 3,
     "GeneratedTokens"),
    ("azure_code", ".csv", "TIMESTAMP,ContextTokens\n" + f"{AZ.format(1)},10\n", 1,
     "GeneratedTokens"),
    ("mooncake_conv", ".jsonl", mooncake(0, 600, 5, [1, 2]) + '{"timestamp": 3,\n', 2,
     "not valid JSON"),
    ("mooncake_conv", ".jsonl", mooncake(0, 600, 5, [1, 2]) + '{"timestamp": 3}\n', 2,
     "missing key"),
    ("mooncake_synthetic", ".jsonl", mooncake(0, 600, 5, [1, 2]) + mooncake(9, 600, 5, [1]),
     2, "hash_ids has 1 ids"),
    ("mooncake_synthetic", ".jsonl", mooncake(0, 600, 5, [1, 2]) + mooncake(9, 0, 5, []), 2,
     "input_length"),
    ("mooncake_conv", ".jsonl", mooncake(5, 10, 5, [1]) + "\n" + mooncake(2, 10, 5, [1]), 3,
     "back in time"),
    ("mooncake_conv", ".jsonl", mooncake(0, 10, 5, [-1]), 1, "integers >= 0"),
    ("sharegpt_tokens", ".jsonl", servingsim(0, [1, 2], 3)
     + servingsim(5, [1, 2], 3).replace('"input_toks": 2', '"input_toks": 3'), 2,
     "input_tok_ids has 2 ids"),
    ("sharegpt_tokens", ".jsonl", servingsim(0, [1, 2], 3) + servingsim(5, [1, 2], -1), 2,
     "output_toks"),
    ("sharegpt_tokens", ".jsonl", servingsim(0, [1, 2], 3) + '{"input_toks": 2}\n', 2,
     "missing key"),
]


BAD_FILES += [
    # lengths no model serves, caught before a single token id is generated
    ("sharegpt", ".csv", VIDUR_HEADER + "10,5,15,2\n1000000000000,5,1000000000005,2\n", 3,
     "num_prefill_tokens 1000000000000 is above 10,000,000 tokens"),
    ("azure_conv", ".csv", AZURE_HEADER + f"{AZ.format(1)},10,5\n{AZ.format(2)},10,"
     + "9" * 30 + "\n", 3, "GeneratedTokens 999"),
    ("mooncake_conv", ".jsonl", mooncake(0, 10, 5, [1]) + mooncake(1, 10**12, 5, [1]), 2,
     "input_length 1000000000000 is above"),
    # integers beyond int64 / float range
    ("mooncake_conv", ".jsonl", mooncake(0, 10, 5, [1]) + mooncake(1, 10, 5, [2**64]), 2,
     "hash_ids must be a list of integers >= 0 and < 2^63"),
    ("mooncake_synthetic", ".jsonl", mooncake(0, 10, 5, [1]) + mooncake(10**400, 10, 5, [1]), 2,
     "timestamp must be a finite number"),
    ("sharegpt_tokens", ".jsonl", servingsim(0, [1, 2], 3) + servingsim(10**30, [1, 2], 3), 2,
     "beyond any trace's span"),
    ("sharegpt_tokens", ".jsonl", servingsim(0, [1, 2], 3) + servingsim(5, [2**70, 2], 3), 2,
     "input_tok_ids must be a list of integers"),
]


@pytest.mark.parametrize("name,suffix,text,line,problem", BAD_FILES)
def test_bad_rows_name_file_line_and_problem(tmp_path, name, suffix, text, line, problem):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(TraceError) as err:
        load_trace(TraceConfig(name=name, path=str(path)))
    message = str(err.value)
    assert str(path) in message and f"line {line}" in message and problem in message


@pytest.mark.parametrize("name,suffix,good,bad", [
    ("sharegpt", ".csv", VIDUR_HEADER + "10,5,15,2\n", b"10,5,15,2\xe9\n"),
    ("mooncake_conv", ".jsonl", mooncake(0, 10, 5, [1]) * 2, b'{"x": "\xff"}\n'),
])
def test_invalid_utf8_names_file_and_line(tmp_path, name, suffix, good, bad):
    path = tmp_path / f"latin1{suffix}"
    path.write_bytes(good.encode() + bad)
    with pytest.raises(TraceError, match=rf"{path}, line 3: invalid "
                       "UTF-8 \\(byte 0x(e9|ff) at column \\d+\\)"):
        load_trace(TraceConfig(name=name, path=str(path)))


def test_dropped_rows_are_reported_with_count_and_reason(caplog):
    cfg = TraceConfig(name="mooncake_conv", num_requests=100, max_total_len=8192)
    with caplog.at_level("WARNING", logger="traces.load"):
        df = load_trace(cfg)
    report = df.attrs["selection"]
    full = load_trace(TraceConfig(name="mooncake_conv"))
    too_long = full["prompt_len"] + full["output_len"] > 8192
    read = report["rows_read"]
    assert len(df) == report["kept"] == 100 and read > 100
    assert report["dropped"] == {"prompt_len + output_len > trace.max_total_len=8192":
                                 int(too_long.head(read).sum())}
    assert read - 100 == int(too_long.head(read).sum())
    assert f"kept 100 of {read} rows read, dropped {read - 100}" in caplog.text
    # nothing dropped, nothing said
    caplog.clear()
    with caplog.at_level("WARNING", logger="traces.load"):
        assert load_trace(TraceConfig(name="sharegpt", num_requests=50)).attrs["selection"][
            "dropped"] == {}
    assert caplog.text == ""


def test_no_request_left_is_an_error():
    with pytest.raises(TraceError, match=r"no request left: all 300 rows were dropped \(300 "
                       r"with prompt_len \+ output_len > trace.max_total_len=512\)"):
        load_trace(TraceConfig(name="sharegpt_tokens", max_total_len=512))


def test_too_many_tokens_to_materialize_is_an_error():
    with pytest.raises(TraceError, match="prompt tokens, about"):
        load_trace(TraceConfig(name="synthetic", num_requests=200_000, prompt_len=8_000_000))


def test_good_temp_files_load(tmp_path):
    """The bad-input cases above differ from these only in the broken row."""
    cases = {"sharegpt": (".csv", VIDUR_HEADER + "10,5,15,2\n\n7,3,10,2\n\n"),
             "azure_conv": (".csv", AZURE_HEADER + f"{AZ.format(1)},10,5\n{AZ.format(3)},7,3\n"),
             "mooncake_conv": (".jsonl", mooncake(0, 600, 5, [1, 2]) + "\n"
                               + mooncake(9, 7, 3, [1])),
             "sharegpt_tokens": (".jsonl", servingsim(0, [1, 2], 5) + servingsim(5, [4], 3))}
    for name, (suffix, text) in cases.items():
        path = tmp_path / f"good_{name}{suffix}"
        path.write_text(text)
        df = load_trace(TraceConfig(name=name, path=str(path)))
        check_canonical(df)
        assert df["output_len"].tolist() == [5, 3]
    assert df["arrival_s"].tolist() == [0.0, 5e-9]
    azure = load_trace(TraceConfig(name="azure_conv", path=str(tmp_path / "good_azure_conv.csv")))
    assert azure["arrival_s"].tolist() == [0.0, 2.0]


def test_missing_file_and_empty_file(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(TraceError, match=f"{missing}: no such trace file"):
        load_trace(TraceConfig(name="arxiv", path=str(missing)))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(TraceError, match="no rows"):
        load_trace(TraceConfig(name="mooncake_conv", path=str(empty)))


@pytest.mark.parametrize("fields,problem", [
    (dict(name="lmsys"), "trace.name must be one of"),
    (dict(tokenizer="gpt2"), "trace.tokenizer"),
    (dict(arrival="weibull"), "trace.arrival"),
    (dict(name="sharegpt", arrival="trace"), "needs timestamps"),
    (dict(request_rate=0), "trace.request_rate"),
    (dict(cv=-1.0), "trace.cv"),
    (dict(time_scale=0.0), "trace.time_scale"),
    (dict(num_requests=0), "trace.num_requests"),
    (dict(seed=-1), "trace.seed"),
    (dict(min_prompt_len=100, max_prompt_len=10), "above trace.max_prompt_len"),
    (dict(length_dist="uniform"), "needs trace.prompt_len_range"),
    (dict(prompt_len_range=[5, 2]), "trace.prompt_len_range"),
    (dict(name="synthetic", path="x.csv"), "generated"),
    (dict(prefix_len=-1), "trace.prefix_len"),
    (dict(prompt_len=10**12), "trace.prompt_len must be at most 10,000,000 tokens"),
    (dict(length_dist="uniform", prompt_len_range=[1, 2], output_len_range=[1, 10**13]),
     "trace.output_len_range must be at most"),
])
def test_bad_config(fields, problem):
    with pytest.raises(TraceError, match=problem):
        TraceConfig(**fields)


def test_every_name_is_covered():
    assert set(TRACE_NAMES) == set(FILE_TRACES + GENERATED)


def test_trace_config_is_a_hydra_structured_config():
    from omegaconf import OmegaConf
    from omegaconf.errors import ValidationError
    schema = OmegaConf.structured(TraceConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, {"name": "shared_prefix",
                                                       "prompt_len_range": [1, 9]}))
    assert isinstance(cfg, TraceConfig) and cfg.prompt_len_range == [1, 9]
    with pytest.raises(ValidationError):
        OmegaConf.merge(schema, {"request_rate": "fast"})
    with pytest.raises(TraceError, match="trace.name"):
        OmegaConf.to_object(OmegaConf.merge(schema, {"name": "nope"}))
