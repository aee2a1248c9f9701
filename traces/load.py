"""Read a trace into the canonical table (DESIGN.md "Requests and traces").

    request_id  str     unique within the trace
    arrival_s   float   seconds from the start, non-decreasing
    prompt_len  int     > 0
    output_len  int     > 0
    and at most one content column:
    prompt_token_ids  list[int]   the prompt itself
    hash_ids          list[int]   one id per df.attrs["hash_block_size"] prompt tokens
                                  (Mooncake: 512); equal ids = equal content

Each reader checks every row and raises `TraceError` naming the file, the 1-based line
and the problem. Readers return lengths, content and `timestamp_s` (seconds, not yet
re-based); `load_trace` filters, keeps the first N and assigns arrivals.
"""
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from traces.config import (SHAREGPT_TOKENS_FILES, TRACE_FILES, TraceConfig, TraceError)
from traces.synthetic import ARRIVAL_STREAM, GENERATORS, arrival_times, rng_for

MOONCAKE_BLOCK = 512   # tokens per hash id in the Mooncake traces
AZURE_TIME = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,9})?"


def _positive_ints(path: Path, df: pd.DataFrame, column: str) -> np.ndarray:
    """`df[column]` as int64, or a TraceError naming the first line (df's index) that is
    not a positive integer."""
    values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    bad = ~(np.isfinite(values) & (values >= 1) & (values == np.round(values)))
    if bad.any():
        i = int(np.argmax(bad))
        raw = df[column].iloc[i]
        problem = "is missing" if raw == "" else f"must be a positive integer, got {raw!r}"
        raise TraceError(f"{path}, line {df.index[i]}: {column} {problem}")
    return values.astype(np.int64)


def _check_sorted(path: Path, seconds: np.ndarray, lines) -> None:
    """TraceError at the first row earlier than the one before it; `lines[i]` is row i's
    line in the file."""
    back = np.flatnonzero(np.diff(seconds) < 0)
    if len(back):
        i = int(back[0]) + 1
        raise TraceError(f"{path}, line {lines[i]}: timestamp goes back in time "
                         f"({seconds[i]:.6f} s after {seconds[i - 1]:.6f} s); rows must be "
                         "sorted by arrival")


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """Every field as text, nothing guessed; the index is each row's line in the file."""
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except pd.errors.ParserError as e:   # e.g. "Expected 4 fields in line 3, saw 5"
        found = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(e))
        if found:
            want, line, saw = found.groups()
            raise TraceError(f"{path}, line {line}: {saw} fields, expected {want}") from None
        raise TraceError(f"{path}: malformed CSV: {str(e).strip()}") from None
    except pd.errors.EmptyDataError:
        raise TraceError(f"{path}: empty file, expected a header {','.join(columns)}") from None
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TraceError(f"{path}, line 1: missing column(s) {missing}; "
                         f"expected {list(columns)}, got {list(df.columns)}")
    df.index = np.arange(len(df)) + 2
    df = df[(df != "").any(axis=1)]   # blank lines are not rows (as in the JSONL readers)
    if len(df) == 0:
        raise TraceError(f"{path}: no rows after the header")
    return df


def read_vidur_csv(path: Path) -> pd.DataFrame:
    """Vidur/Sarathi length CSVs: num_prefill_tokens,num_decode_tokens,num_total_tokens,
    pd_ratio. Lengths only, no timestamps."""
    df = _read_csv(path, ("num_prefill_tokens", "num_decode_tokens", "num_total_tokens"))
    prompt = _positive_ints(path, df, "num_prefill_tokens")
    output = _positive_ints(path, df, "num_decode_tokens")
    total = _positive_ints(path, df, "num_total_tokens")
    wrong = np.flatnonzero(total != prompt + output)
    if len(wrong):
        i = int(wrong[0])
        raise TraceError(f"{path}, line {df.index[i]}: num_total_tokens ({total[i]}) is not "
                         f"num_prefill_tokens + num_decode_tokens ({prompt[i]} + {output[i]})")
    return pd.DataFrame({"prompt_len": prompt, "output_len": output})


def read_azure_csv(path: Path) -> pd.DataFrame:
    """Azure LLM inference trace 2023: TIMESTAMP,ContextTokens,GeneratedTokens, where
    TIMESTAMP is 'YYYY-MM-DD HH:MM:SS.fffffff' (7 fractional digits, one more than
    strptime's %f takes, so the fraction is parsed on its own)."""
    df = _read_csv(path, ("TIMESTAMP", "ContextTokens", "GeneratedTokens"))
    stamps = df["TIMESTAMP"].astype(str).str.strip()
    ok = stamps.str.fullmatch(AZURE_TIME).to_numpy(dtype=bool)
    whole = pd.to_datetime(stamps.str.slice(0, 19), format="%Y-%m-%d %H:%M:%S", errors="coerce")
    ok = ok & whole.notna().to_numpy()
    if not ok.all():
        i = int(np.argmin(ok))
        raise TraceError(f"{path}, line {df.index[i]}: TIMESTAMP must look like "
                         f"'2023-11-16 18:15:46.6805900', got {df['TIMESTAMP'].iloc[i]!r}")
    # Whole seconds and the fraction are re-based apart: as one float since 1970 the
    # fraction would lose its last digits.
    seconds = (whole - whole.iloc[0]).dt.total_seconds().to_numpy()
    fraction = pd.to_numeric("0" + stamps.str.slice(19)).to_numpy(dtype=float)
    seconds = seconds + fraction - fraction[0]
    _check_sorted(path, seconds, df.index)
    return pd.DataFrame({"prompt_len": _positive_ints(path, df, "ContextTokens"),
                         "output_len": _positive_ints(path, df, "GeneratedTokens"),
                         "timestamp_s": seconds})


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line, each checked to hold `keys`."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{path}, line {line_no}: not valid JSON ({e})") from None
            if not isinstance(row, dict):
                raise TraceError(f"{path}, line {line_no}: expected a JSON object, "
                                 f"got {type(row).__name__}")
            missing = [k for k in keys if k not in row]
            if missing:
                raise TraceError(f"{path}, line {line_no}: missing key(s) {missing}; "
                                 f"expected {list(keys)}")
            rows.append((line_no, row))
    if not rows:
        raise TraceError(f"{path}: no rows")
    return rows


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(path: Path, line_no: int, row: dict, key: str, positive: bool = True):
    value = row[key]
    if positive and not (_is_int(value) and value >= 1):
        raise TraceError(f"{path}, line {line_no}: {key} must be a positive integer, "
                         f"got {value!r}")
    if not positive and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                             and math.isfinite(value)):
        raise TraceError(f"{path}, line {line_no}: {key} must be a number, got {value!r}")
    return value


def _id_list(path: Path, line_no: int, row: dict, key: str, length: int, what: str) -> list:
    ids = row[key]
    if not (isinstance(ids, list) and all(_is_int(i) and i >= 0 for i in ids)):
        raise TraceError(f"{path}, line {line_no}: {key} must be a list of integers >= 0")
    if len(ids) != length:
        raise TraceError(f"{path}, line {line_no}: {key} has {len(ids)} ids, expected "
                         f"{length} ({what})")
    return ids


def read_mooncake_jsonl(path: Path) -> pd.DataFrame:
    """Mooncake (FAST'25): {timestamp (ms), input_length, output_length, hash_ids}, one
    hash id per 512-token block of the prompt."""
    keys = ("timestamp", "input_length", "output_length", "hash_ids")
    prompt, output, stamps, hash_ids = [], [], [], []
    rows = _read_jsonl(path, keys)
    for line_no, row in rows:
        n = _field(path, line_no, row, "input_length")
        prompt.append(n)
        output.append(_field(path, line_no, row, "output_length"))
        stamps.append(_field(path, line_no, row, "timestamp", positive=False) / 1e3)
        hash_ids.append(_id_list(path, line_no, row, "hash_ids", -(-n // MOONCAKE_BLOCK),
                                 f"ceil(input_length / {MOONCAKE_BLOCK})"))
    seconds = np.asarray(stamps, dtype=float)
    _check_sorted(path, seconds, [line for line, _ in rows])
    df = pd.DataFrame({"prompt_len": prompt, "output_len": output, "timestamp_s": seconds,
                       "hash_ids": hash_ids})
    df.attrs["hash_block_size"] = MOONCAKE_BLOCK
    return df


def read_servingsim_jsonl(path: Path) -> pd.DataFrame:
    """LLMServingSim ShareGPT workloads: {input_toks, output_toks, arrival_time_ns,
    input_tok_ids, output_tok_ids}; the prompt's real token ids are kept."""
    keys = ("input_toks", "output_toks", "arrival_time_ns", "input_tok_ids")
    prompt, output, stamps, token_ids = [], [], [], []
    rows = _read_jsonl(path, keys)
    for line_no, row in rows:
        n = _field(path, line_no, row, "input_toks")
        prompt.append(n)
        output.append(_field(path, line_no, row, "output_toks"))
        stamps.append(_field(path, line_no, row, "arrival_time_ns", positive=False) / 1e9)
        token_ids.append(_id_list(path, line_no, row, "input_tok_ids", n, "input_toks"))
    seconds = np.asarray(stamps, dtype=float)
    _check_sorted(path, seconds, [line for line, _ in rows])
    return pd.DataFrame({"prompt_len": prompt, "output_len": output, "timestamp_s": seconds,
                         "prompt_token_ids": token_ids})


READERS = {
    "sharegpt": read_vidur_csv, "arxiv": read_vidur_csv, "bwb": read_vidur_csv,
    "azure_conv": read_azure_csv, "azure_code": read_azure_csv,
    "mooncake_conv": read_mooncake_jsonl, "mooncake_synthetic": read_mooncake_jsonl,
    "sharegpt_tokens": read_servingsim_jsonl,
}


def trace_path(cfg: TraceConfig) -> Path:
    """The file `cfg` reads: `cfg.path`, or the shipped file next to this module."""
    if cfg.path is not None:
        return Path(cfg.path)
    name = TRACE_FILES[cfg.name] or SHAREGPT_TOKENS_FILES[cfg.tokenizer]
    return Path(__file__).parent / name


def load_trace(cfg: TraceConfig) -> pd.DataFrame:
    """The canonical table for `cfg`: rows that pass the length filters, the first
    `cfg.num_requests` of them in file order, with arrival times assigned. Deterministic
    in `cfg`. Raises TraceError on a missing file or a bad row."""
    if cfg.name in GENERATORS:
        df = GENERATORS[cfg.name](cfg)
    else:
        path = trace_path(cfg)
        if not path.is_file():
            raise TraceError(f"{path}: no such trace file (trace.name={cfg.name!r})")
        df = READERS[cfg.name](path)
        # ids count data rows from 0 in file order, so they survive filtering unchanged
        df.insert(0, "request_id", [str(i) for i in range(len(df))])

    total = df["prompt_len"] + df["output_len"]
    keep = ((df["prompt_len"] >= cfg.min_prompt_len) & (df["output_len"] >= cfg.min_output_len)
            & (df["prompt_len"] <= (cfg.max_prompt_len or np.inf))
            & (df["output_len"] <= (cfg.max_output_len or np.inf))
            & (total <= (cfg.max_total_len or np.inf)))
    df = df[keep].head(cfg.num_requests).reset_index(drop=True)   # head(None) keeps all

    arrival = cfg.arrival or cfg.default_arrival
    if arrival == "trace":
        stamps = df["timestamp_s"].to_numpy()
        arrival_s = (stamps - stamps[0]) * cfg.time_scale if len(df) else stamps
    else:
        arrival_s = arrival_times(arrival, len(df), cfg.request_rate, cfg.cv,
                                  rng_for(cfg.seed, ARRIVAL_STREAM))
    content = [c for c in ("prompt_token_ids", "hash_ids") if c in df.columns]
    out = pd.DataFrame({"request_id": df["request_id"],
                        "arrival_s": np.asarray(arrival_s, dtype=np.float64),
                        "prompt_len": df["prompt_len"].astype(np.int64),
                        "output_len": df["output_len"].astype(np.int64),
                        **{c: df[c] for c in content}})
    out.attrs = dict(df.attrs)
    return out
