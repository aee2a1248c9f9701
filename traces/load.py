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
and the problem (invalid UTF-8, a malformed row, a value out of range, a length no model
serves). Readers return lengths, content, `timestamp_s` (seconds, not yet re-based) and
`line` (the row's line in the file, kept so later checks such as the vocabulary's can
name it too); `load_trace` filters, keeps the first N, reports what it dropped and why,
and assigns arrivals.
"""
import json
import logging
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from traces.config import (MAX_ROW_TOKENS, SHAREGPT_TOKENS_FILES, TRACE_FILES, TraceConfig,
                           TraceError)
from traces.synthetic import ARRIVAL_STREAM, GENERATORS, arrival_times, rng_for

log = logging.getLogger(__name__)

MOONCAKE_BLOCK = 512   # tokens per hash id in the Mooncake traces
AZURE_TIME = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}(\.\d{1,9})?"
MAX_ID = 2**63 - 1     # token and hash ids are stored as int64
MAX_SECONDS = 1e12     # timestamps beyond ~30,000 years are broken, and lose float precision


def _check_utf8(path: Path) -> None:
    """TraceError naming the line of the first byte that is not UTF-8."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise TraceError(f"{path}, line {line}: invalid UTF-8 (byte 0x{data[e.start]:02x} "
                         f"at column {column}); trace files must be UTF-8 text") from None


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
    too_long = values > MAX_ROW_TOKENS
    if too_long.any():
        i = int(np.argmax(too_long))
        raise TraceError(f"{path}, line {df.index[i]}: {column} {df[column].iloc[i]} is above "
                         f"{MAX_ROW_TOKENS:,} tokens, longer than any model serves")
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
    _check_utf8(path)
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
    return pd.DataFrame({"prompt_len": prompt, "output_len": output, "line": df.index})


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
                         "timestamp_s": seconds, "line": df.index})


def _read_jsonl(path: Path, keys: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line number, object) per non-blank line, each checked to hold `keys`."""
    rows = []
    _check_utf8(path)
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except RecursionError:
                raise TraceError(f"{path}, line {line_no}: JSON nested too deeply") from None
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


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(path: Path, line_no: int, row: dict, key: str, positive: bool = True):
    """A length (positive: an integer in [1, MAX_ROW_TOKENS]) or a timestamp (a finite
    number of magnitude <= MAX_SECONDS once scaled to seconds by the caller's unit)."""
    value = row[key]
    if positive:
        if not (_is_int(value) and value >= 1):
            raise TraceError(f"{path}, line {line_no}: {key} must be a positive integer, "
                             f"got {_short(value)}")
        if value > MAX_ROW_TOKENS:
            raise TraceError(f"{path}, line {line_no}: {key} {_short(value)} is above "
                             f"{MAX_ROW_TOKENS:,} tokens, longer than any model serves")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # an int too large for a float would raise OverflowError in isfinite: compare first
    if not (number and abs(value) < 1e300 and math.isfinite(value)):
        raise TraceError(f"{path}, line {line_no}: {key} must be a finite number, "
                         f"got {_short(value)}")
    return value


def _seconds(path: Path, line_no: int, row: dict, key: str, per_second: float) -> float:
    seconds = _field(path, line_no, row, key, positive=False) / per_second
    if abs(seconds) > MAX_SECONDS:
        raise TraceError(f"{path}, line {line_no}: {key} {_short(row[key])} is "
                         f"{seconds:.3g} s, beyond any trace's span")
    return seconds


def _id_list(path: Path, line_no: int, row: dict, key: str, length: int, what: str) -> list:
    ids = row[key]
    if not (isinstance(ids, list) and all(_is_int(i) and 0 <= i <= MAX_ID for i in ids)):
        raise TraceError(f"{path}, line {line_no}: {key} must be a list of integers >= 0 "
                         "and < 2^63")
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
        stamps.append(_seconds(path, line_no, row, "timestamp", 1e3))
        hash_ids.append(_id_list(path, line_no, row, "hash_ids", -(-n // MOONCAKE_BLOCK),
                                 f"ceil(input_length / {MOONCAKE_BLOCK})"))
    seconds = np.asarray(stamps, dtype=float)
    _check_sorted(path, seconds, [line for line, _ in rows])
    df = pd.DataFrame({"prompt_len": prompt, "output_len": output, "timestamp_s": seconds,
                       "hash_ids": hash_ids, "line": [line for line, _ in rows]})
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
        stamps.append(_seconds(path, line_no, row, "arrival_time_ns", 1e9))
        token_ids.append(_id_list(path, line_no, row, "input_tok_ids", n, "input_toks"))
    seconds = np.asarray(stamps, dtype=float)
    _check_sorted(path, seconds, [line for line, _ in rows])
    return pd.DataFrame({"prompt_len": prompt, "output_len": output, "timestamp_s": seconds,
                         "prompt_token_ids": token_ids, "line": [line for line, _ in rows]})


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


# Prompt tokens a whole replay may materialize (8 bytes each: ~8 GB).
MAX_TRACE_TOKENS = 1_000_000_000


def select(df: pd.DataFrame, cfg: TraceConfig) -> tuple[pd.DataFrame, dict]:
    """The rows that pass `cfg`'s length filters, the first `cfg.num_requests` of them, and
    a report: {"rows_read": rows up to the last one kept (every row if fewer pass), "kept",
    "dropped": {reason: count}}. A row failing several filters counts under its first."""
    total = df["prompt_len"] + df["output_len"]
    filters = (
        (f"prompt_len < trace.min_prompt_len={cfg.min_prompt_len}",
         df["prompt_len"] < cfg.min_prompt_len),
        (f"output_len < trace.min_output_len={cfg.min_output_len}",
         df["output_len"] < cfg.min_output_len),
        (f"prompt_len > trace.max_prompt_len={cfg.max_prompt_len}",
         df["prompt_len"] > (cfg.max_prompt_len or np.inf)),
        (f"output_len > trace.max_output_len={cfg.max_output_len}",
         df["output_len"] > (cfg.max_output_len or np.inf)),
        (f"prompt_len + output_len > trace.max_total_len={cfg.max_total_len}",
         total > (cfg.max_total_len or np.inf)))
    keep = np.ones(len(df), dtype=bool)
    reason = np.full(len(df), -1)
    for i, (_, failed) in enumerate(filters):
        failed = failed.to_numpy() & keep
        reason[failed] = i
        keep &= ~failed
    kept_rows = np.flatnonzero(keep)
    if cfg.num_requests is not None and len(kept_rows) >= cfg.num_requests:
        read = int(kept_rows[cfg.num_requests - 1]) + 1    # rows the selection looked at
        kept_rows = kept_rows[:cfg.num_requests]
    else:
        read = len(df)
    counts = np.bincount(reason[:read][reason[:read] >= 0], minlength=len(filters))
    dropped = {filters[i][0]: int(n) for i, n in enumerate(counts) if n}
    selected = df.iloc[kept_rows].reset_index(drop=True)
    selected.attrs = dict(df.attrs)
    return selected, {"rows_read": read, "kept": len(kept_rows), "dropped": dropped}


def describe_selection(name: str, report: dict) -> str:
    """One line: how many rows were kept, how many dropped and why."""
    why = "; ".join(f"{n} with {reason}" for reason, n in report["dropped"].items())
    dropped = report["rows_read"] - report["kept"]
    return (f"trace {name!r}: kept {report['kept']} of {report['rows_read']} rows read, "
            f"dropped {dropped} ({100 * dropped / max(report['rows_read'], 1):.0f}%): {why}")


def load_trace(cfg: TraceConfig) -> pd.DataFrame:
    """The canonical table for `cfg`: rows that pass the length filters, the first
    `cfg.num_requests` of them in file order, with arrival times assigned. Deterministic
    in `cfg`. Dropped rows are logged (a warning with the count per reason) and reported in
    `df.attrs["selection"]`. Raises TraceError on a missing file, a bad row, or when no row
    passes the filters."""
    if cfg.name in GENERATORS:
        df = GENERATORS[cfg.name](cfg)
        source = f"generator {cfg.name!r}"
    else:
        path = trace_path(cfg)
        if not path.is_file():
            raise TraceError(f"{path}: no such trace file (trace.name={cfg.name!r})")
        df = READERS[cfg.name](path)
        # ids count data rows from 0 in file order, so they survive filtering unchanged
        df.insert(0, "request_id", [str(i) for i in range(len(df))])
        df.attrs["source"] = str(path)
        source = str(path)

    df, report = select(df, cfg)
    if report["kept"] == 0:
        raise TraceError(f"{source}: no request left: all {report['rows_read']} rows were "
                         "dropped (" + "; ".join(f"{n} with {r}" for r, n in
                                                 report["dropped"].items())
                         + "); relax the filter or raise the limit it names")
    if report["dropped"]:
        log.warning(describe_selection(cfg.name, report))
    prompt_tokens = int(df["prompt_len"].sum())
    if prompt_tokens > MAX_TRACE_TOKENS:
        raise TraceError(f"{source}: the {len(df)} requests kept hold {prompt_tokens:,} prompt "
                         f"tokens, about {8 * prompt_tokens / 2**30:.0f} GiB of token ids "
                         f"(limit {MAX_TRACE_TOKENS:,}); lower trace.num_requests")

    arrival = cfg.arrival or cfg.default_arrival
    if arrival == "trace":
        stamps = df["timestamp_s"].to_numpy()
        arrival_s = (stamps - stamps[0]) * cfg.time_scale
    else:
        arrival_s = arrival_times(arrival, len(df), cfg.request_rate, cfg.cv,
                                  rng_for(cfg.seed, ARRIVAL_STREAM))
    content = [c for c in ("prompt_token_ids", "hash_ids", "line") if c in df.columns]
    out = pd.DataFrame({"request_id": df["request_id"],
                        "arrival_s": np.asarray(arrival_s, dtype=np.float64),
                        "prompt_len": df["prompt_len"].astype(np.int64),
                        "output_len": df["output_len"].astype(np.int64),
                        **{c: df[c] for c in content}})
    out.attrs = dict(df.attrs) | {"selection": report}
    return out
