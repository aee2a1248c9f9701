"""Serving metrics from a requests table, with the semantics of `vllm bench serve`.

The table is `requests.parquet` (one row a request): arrival_s, first_token_s, finish_s,
prompt_len, output_len, cached_prompt_tokens, num_preemptions, token_times_s (the time of
every output token), finish_reason. Times are seconds on the replay's clock, which starts at
0 when the replay starts (simulated time in the simulator, wall time on the GPU).

Definitions (per request, then aggregated):
    TTFT = first token - arrival            E2EL = finish - arrival
    TPOT = (finish - first token) / (output_len - 1), only when output_len > 1
    ITL  = gaps between consecutive output tokens
Two traps kept on purpose, as vLLM does: TPOT statistics weigh every request once, ITL
statistics pool every gap of every request (long outputs weigh more); a request with one
output token has no TPOT. Percentiles are `np.percentile` (linear), std is the population std.
Goodput counts requests meeting every SLO given (a request with <= 1 output token counts
TPOT = 0). Peak output throughput and peak concurrency come from 1-second bins from the
first arrival; mean concurrency (SGLang's) is the sum of E2ELs over the duration.
"""
import math

import numpy as np
import pandas as pd

LATENCIES = ("ttft", "tpot", "itl", "e2el")
STATS = ("mean", "median", "std", "p90", "p99")
SLO_KEYS = ("ttft_ms", "tpot_ms", "e2el_ms")


def add_latencies(df: pd.DataFrame) -> pd.DataFrame:
    """Adds ttft_s, tpot_s (NaN when output_len <= 1) and e2el_s columns, in place."""
    df["ttft_s"] = df["first_token_s"] - df["arrival_s"]
    decode_tokens = (df["output_len"] - 1).where(df["output_len"] > 1)   # NaN: no TPOT
    df["tpot_s"] = (df["finish_s"] - df["first_token_s"]) / decode_tokens
    df["e2el_s"] = df["finish_s"] - df["arrival_s"]
    return df


def completed(df: pd.DataFrame) -> pd.DataFrame:
    """Requests that finished normally (not aborted, with a finish time)."""
    return df[df["finish_s"].notna() & (df["finish_reason"] != "abort")]


def itls(df: pd.DataFrame) -> np.ndarray:
    """All inter-token gaps of all requests, pooled (seconds)."""
    gaps = [np.diff(np.asarray(times, dtype=float)) for times in df["token_times_s"]]
    return np.concatenate(gaps) if gaps else np.empty(0)


def latency_samples(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per-metric samples in seconds, as the statistics use them (completed requests)."""
    df = add_latencies(completed(df).copy())
    return {"ttft": df["ttft_s"].to_numpy(float), "tpot": df["tpot_s"].dropna().to_numpy(float),
            "itl": itls(df), "e2el": df["e2el_s"].to_numpy(float)}


def _stats(name: str, seconds: np.ndarray) -> dict:
    ms = np.asarray(seconds, dtype=float) * 1000.0
    if ms.size == 0:
        return {f"{s}_{name}_ms": math.nan for s in STATS}
    return {f"mean_{name}_ms": float(np.mean(ms)), f"median_{name}_ms": float(np.median(ms)),
            f"std_{name}_ms": float(np.std(ms)), f"p90_{name}_ms": float(np.percentile(ms, 90)),
            f"p99_{name}_ms": float(np.percentile(ms, 99))}


def good_requests(df: pd.DataFrame, slos: dict) -> np.ndarray:
    """Boolean mask over completed requests: True where every SLO given (ms) is met."""
    df = add_latencies(completed(df).copy())
    good = np.ones(len(df), dtype=bool)
    tpot = df["tpot_s"].fillna(0.0)      # <= 1 output token: TPOT counts as 0
    for key, seconds in (("ttft_ms", df["ttft_s"]), ("tpot_ms", tpot), ("e2el_ms", df["e2el_s"])):
        if slos.get(key) is not None:
            good &= (seconds * 1000.0 <= slos[key]).to_numpy()
    return good


def _peaks(df: pd.DataFrame) -> tuple[float, int]:
    """(max output tokens in any 1-s bin, max requests active in any 1-s bin)."""
    if df.empty:
        return 0.0, 0
    t0 = df["arrival_s"].min()
    num_bins = int(math.ceil(df["finish_s"].max() - t0)) + 1
    token_times = np.concatenate([np.asarray(t, dtype=float) for t in df["token_times_s"]])
    token_bins = np.floor(token_times - t0).astype(int)
    tokens_per_bin = np.bincount(token_bins[(token_bins >= 0) & (token_bins < num_bins)],
                                 minlength=num_bins)
    # A request is active in every bin from its arrival's to its finish's (inclusive):
    # +1 at the first bin, -1 after the last, then a running sum.
    first = np.floor(df["arrival_s"].to_numpy(float) - t0).astype(int)
    last = np.floor(df["finish_s"].to_numpy(float) - t0).astype(int)
    delta = np.zeros(num_bins + 1, dtype=int)
    np.add.at(delta, first, 1)
    np.add.at(delta, last + 1, -1)
    return float(tokens_per_bin.max()), int(np.cumsum(delta).max())


def compute_metrics(requests: pd.DataFrame, duration_s: float | None = None,
                    slos: dict | None = None) -> dict:
    """The run's metrics (names as in DESIGN.md). `duration_s` defaults to the last finish
    time (the replay clock starts at 0). `slos`: {"ttft_ms", "tpot_ms", "e2el_ms"} -> limit
    or None; request_goodput (and slo_attainment, the good fraction) appear only when at
    least one limit is given."""
    done = add_latencies(completed(requests).copy())
    if duration_s is None:
        duration_s = float(done["finish_s"].max()) if len(done) else 0.0
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: math.nan)
    input_tokens, output_tokens = int(done["prompt_len"].sum()), int(done["output_len"].sum())
    gaps = itls(done)
    peak_tok_s, peak_concurrency = _peaks(done)
    m = {"completed": len(done), "failed": len(requests) - len(done), "duration_s": duration_s,
         "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
         "request_throughput": per_s(len(done)), "output_throughput": per_s(output_tokens),
         "total_token_throughput": per_s(input_tokens + output_tokens)}
    slos = {k: v for k, v in (slos or {}).items() if v is not None}
    unknown = set(slos) - set(SLO_KEYS)
    if unknown:
        raise ValueError(f"unknown SLO keys {sorted(unknown)}; expected some of {SLO_KEYS}")
    if slos:
        good = int(good_requests(requests, slos).sum())
        m["request_goodput"] = per_s(good)
        m["slo_attainment"] = good / len(done) if len(done) else math.nan
    m |= _stats("ttft", done["ttft_s"]) | _stats("tpot", done["tpot_s"].dropna())
    m |= _stats("itl", gaps) | _stats("e2el", done["e2el_s"])
    m["max_itl_ms"] = float(gaps.max() * 1000.0) if gaps.size else math.nan
    m["peak_output_tok_s"] = peak_tok_s
    m["peak_concurrency"] = peak_concurrency
    m["mean_concurrency"] = per_s(float(done["e2el_s"].sum()))
    cached = int(done["cached_prompt_tokens"].sum())
    m["prefix_cache_hit_rate"] = cached / input_tokens if input_tokens else 0.0
    m["num_preemptions"] = int(done["num_preemptions"].sum())
    return m


def format_value(value: float) -> str:
    """A table cell: 5380.2 -> '5,380', 12.345 -> '12.3', 0.01234 -> '0.0123'."""
    if value is None or not np.isfinite(value):
        return "n/a"
    magnitude = abs(value)
    if magnitude >= 100:
        return f"{value:,.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def format_report(m: dict) -> str:
    """The `vllm bench serve` result block (same rows and labels), for any metrics dict."""
    def row(label, value):
        if isinstance(value, (int, np.integer)):
            return f"{label:<40} {value:<10}"
        return f"{label:<40} {value:<10.2f}"

    lines = ["{:=^50}".format(" Serving Benchmark Result "),
             row("Successful requests:", m["completed"]),
             row("Failed requests:", m["failed"]),
             row("Benchmark duration (s):", m["duration_s"]),
             row("Total input tokens:", m["total_input_tokens"]),
             row("Total generated tokens:", m["total_output_tokens"]),
             row("Request throughput (req/s):", m["request_throughput"])]
    if "request_goodput" in m:
        lines.append(row("Request goodput (req/s):", m["request_goodput"]))
    lines += [row("Output token throughput (tok/s):", m["output_throughput"]),
              row("Peak output token throughput (tok/s):", m["peak_output_tok_s"]),
              row("Peak concurrent requests:", m["peak_concurrency"]),
              row("Total token throughput (tok/s):", m["total_token_throughput"])]
    sections = (("ttft", "TTFT", "Time to First Token"),
                ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
                ("itl", "ITL", "Inter-token Latency"),
                ("e2el", "E2EL", "End-to-end Latency"))
    for key, short, title in sections:
        lines.append("{:-^50}".format(title))
        lines.append(row(f"Mean {short} (ms):", m[f"mean_{key}_ms"]))
        lines.append(row(f"Median {short} (ms):", m[f"median_{key}_ms"]))
        lines.append(row(f"P90 {short} (ms):", m[f"p90_{key}_ms"]))
        lines.append(row(f"P99 {short} (ms):", m[f"p99_{key}_ms"]))
    lines.append("=" * 50)
    return "\n".join(lines)
