"""python -m bench --url http://127.0.0.1:8000 --trace sharegpt --num-prompts 200 \\
    --request-rate 10 --out runs/http-sharegpt

Replays a trace (a conf/trace name, with TraceConfig fields overridable by --set KEY=VALUE)
against an OpenAI-compatible server at the trace's arrival times, then writes
requests.parquet, steps.parquet and summary.json to --out and prints the table of
`vllm bench serve`. Compare with an offline or simulated run of the same trace:
`python -m analysis --compare RUN_DIR OTHER_RUN_DIR`.
"""
import argparse
import asyncio
import dataclasses
import sys
from pathlib import Path

import pandas as pd
import yaml
from tqdm import tqdm

from analysis.metrics import compute_metrics, format_report
from bench.client import (Sender, Target, replay, request_table, reset_prefix_cache, scrape,
                          server_model, server_side, ttft_split, warm_up)
from experiments import results
from policy import Batch
from traces import TraceConfig, TraceError, load_trace, materialize

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "trace"
SLO_KEYS = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2el": "e2el_ms"}
# steps.parquet stays empty (a client sees no steps) but has the step log's columns
STEP_COLUMNS = (*Batch().record(0.0, 0.0), "launch_s", "tokens_s", "end_s", "device_s",
                "replica", "step", "kv_usage")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="the server's base URL (without /v1)")
    p.add_argument("--model", help="the `model` field (default: the first id of /v1/models)")
    p.add_argument("--api-key", help="sent as `Authorization: Bearer KEY`")
    p.add_argument("--trace", default="sharegpt",
                   help="a conf/trace name (default sharegpt) or a .yaml file with TraceConfig fields")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TraceConfig field (YAML value), e.g. --set max_total_len=4096")
    p.add_argument("--num-prompts", type=int, help="requests to send (trace.num_requests)")
    p.add_argument("--request-rate", type=float,
                   help="requests/s of the trace's arrival process; inf = all at once")
    p.add_argument("--seed", type=int, help="trace.seed: arrivals and prompt content")
    p.add_argument("--max-concurrency", type=int,
                   help="most requests in flight; later arrivals wait (default: no limit)")
    p.add_argument("--vocab-size", type=int, default=32000,
                   help="prompt token ids are drawn below it (default 32000: valid for every "
                        "model in conf/model; use the model's own to match an offline run's ids)")
    p.add_argument("--block-size", type=int, default=16, help="as the offline run's cache.block_size")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly the trace's output lengths (default on)")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="sampling temperature of every request (default 1.0, as the offline "
                        "replay samples; 0 = greedy)")
    p.add_argument("--num-warmups", type=int, default=0,
                   help="throwaway requests before the clock starts (default 0)")
    p.add_argument("--reset-prefix-cache", action="store_true",
                   help="after the warm-up, empty the server's prefix cache (POST "
                        "/reset_prefix_cache: this server, or vLLM with VLLM_SERVER_DEV_MODE=1), "
                        "so the run starts as an offline replay does, whatever ran before")
    p.add_argument("--goodput", nargs="+", default=[], metavar="KEY:MS",
                   help="SLOs for goodput, as vLLM: ttft:500 tpot:50 e2el:10000")
    p.add_argument("--http-client", choices=Sender.CLIENTS, default="lean",
                   help="lean: HTTP/1.1 on asyncio streams (default; little Python per stream "
                        "chunk); httpx: the general client, as a cross-check")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per request")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--disable-tqdm", action="store_true")
    return p.parse_args(argv)


def trace_config(args) -> TraceConfig:
    path = Path(args.trace) if args.trace.endswith((".yaml", ".yml")) else CONF_DIR / f"{args.trace}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
        raise TraceError(f"unknown trace {args.trace!r}: no {path}; known: {known}")
    fields = yaml.safe_load(path.read_text()) or {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise TraceError(f"--set wants KEY=VALUE, got {item!r}")
        fields[key] = yaml.safe_load(value)
    if args.num_prompts is not None:
        fields["num_requests"] = args.num_prompts
    if args.request_rate is not None:
        if args.request_rate == float("inf"):
            fields["arrival"] = "burst"
        else:
            fields["request_rate"] = args.request_rate
    if args.seed is not None:
        fields["seed"] = args.seed
    names = {f.name for f in dataclasses.fields(TraceConfig)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise TraceError(f"unknown trace field(s) {unknown}; TraceConfig has {sorted(names)}")
    return TraceConfig(**fields)


def slos(goodput: list[str]) -> dict:
    out = {}
    for item in goodput:
        key, _, value = item.partition(":")
        if key not in SLO_KEYS:
            raise ValueError(f"--goodput {item!r}: the key must be one of {sorted(SLO_KEYS)}")
        out[SLO_KEYS[key]] = float(value)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        trace = trace_config(args)
        requests = materialize(load_trace(trace), args.block_size, args.vocab_size, trace.seed)
        goodput = slos(args.goodput)
    except ValueError as e:
        sys.exit(f"error: {e}")
    url = args.url.rstrip("/")
    listed, max_model_len = server_model(url, args.api_key)
    model = args.model or listed
    target = Target(url, model, args.api_key, args.ignore_eos, args.temperature, args.timeout)
    print(f"{len(requests)} requests of trace {trace.name!r} -> {url} (model {model!r})")
    asyncio.run(warm_up(target, [len(r.prompt_token_ids) for r in requests], args.num_warmups,
                        max_model_len, args.http_client))
    if args.reset_prefix_cache:
        try:
            reset_prefix_cache(target)
        except RuntimeError as e:
            sys.exit(f"error: {e}")
    before = scrape(url)
    with tqdm(total=len(requests), unit="req", disable=args.disable_tqdm) as bar:
        records, t0, duration = asyncio.run(replay(target, requests, args.max_concurrency, bar.update,
                                                    args.http_client))
    server = server_side(before, scrape(url))
    table = request_table(records, t0)
    metrics = compute_metrics(table, duration_s=duration, slos=goodput)
    config = {"trace": dataclasses.asdict(trace), "bench": {
        "url": url, "model": model, "max_concurrency": args.max_concurrency,
        "vocab_size": args.vocab_size, "ignore_eos": args.ignore_eos,
        "temperature": args.temperature, "http_client": args.http_client,
        "num_warmups": args.num_warmups, "reset_prefix_cache": args.reset_prefix_cache},
        "slo": goodput}
    summary = {"config": config, "metrics": metrics, "versions": results.versions(), "gpu": None,
               "mode": "http", "run": {"num_requests": len(table), "wall_s": duration},
               "server_metrics": server}
    no_steps = pd.DataFrame({c: pd.Series(dtype=float) for c in STEP_COLUMNS})   # the server's
    split = ttft_split(metrics["mean_ttft_ms"], server) if metrics["completed"] else None
    summary["ttft_split"] = split
    results.write(args.out, table, no_steps, summary)
    print(format_report(metrics))
    if server and server["mean_time_to_first_token_ms"] is not None:
        print(f"server-side (/metrics over the run): mean TTFT {server['mean_time_to_first_token_ms']:.2f} ms, "
              f"mean ITL {server['mean_inter_token_latency_ms'] or 0:.2f} ms, mean E2E "
              f"{server['mean_e2e_request_latency_ms']:.2f} ms; HTTP and client add "
              f"{metrics['mean_ttft_ms'] - server['mean_time_to_first_token_ms']:.2f} ms to the mean TTFT")
    if split:
        print(f"mean TTFT {metrics['mean_ttft_ms']:.2f} ms = client and transport {split['client_ms']:.2f} "
              f"+ server prepare {split['prepare_ms']:.2f} + engine {split['engine_ms']:.2f} + handoff "
              f"{split['handoff_ms']:.2f} + write {split['write_ms']:.2f} ms ({args.http_client} client)")
    errors = table["error"].dropna()
    if len(errors):
        print(f"{len(errors)} failed requests; the first: {errors.iloc[0]}")
    print(f"results: {args.out}")
    return metrics


if __name__ == "__main__":
    main()
