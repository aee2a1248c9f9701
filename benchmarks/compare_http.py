"""The HTTP layer's cost and the twin over HTTP, from the run directories of
benchmarks/h200_http.sh: for each load, the engine over HTTP (python -m bench against
python -m server) against the offline mode=gpu replay of the same trace, and the simulated
server over HTTP against both. Prints one table and ends with one JSON line.

    python benchmarks/compare_http.py RUNS_DIR      # RUNS_DIR/{offline,http,sim,simoff}_<rate>

For every HTTP run of this project's server, the client's mean TTFT is split into the
client and transport, and the server's stages (prepare, the engine's TTFT, handoff,
write: its twinserve: histograms); HTTP's cost on TTFT (against the offline replay) is
then (engine in the server - offline) + the server's HTTP path + the client's share.
`*_httpx` runs are the same server measured by the httpx client: the lean client's
cross-check (their difference in the client's share is the client's own cost).

Targets (issue 11): the HTTP layer adds <= 5 % to TPOT and <= 10 ms to TTFT (mean and
median); the twin's error is reported against the engine's HTTP run.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from analysis.runs import load_run  # noqa: E402
from bench.client import ttft_split  # noqa: E402

# gpu offline, gpu over HTTP (engine process; the lean client), the same measured by the
# httpx client (the client's cross-check), the engine in the server's process, twin over
# HTTP (lean, httpx), twin offline
KINDS = ("offline", "http", "http_httpx", "http_inproc", "sim", "sim_httpx", "simoff")
HTTP_KINDS = ("http", "http_httpx", "http_inproc", "sim", "sim_httpx")
STATS = ("mean", "median", "p99")


def metrics(root: Path, kind: str, rate: str) -> dict | None:
    """The run's metrics, plus, for HTTP runs, the server-side mean TTFT (server_ttft_ms)
    and the split of the client's mean TTFT (ttft_split: bench.client.ttft_split)."""
    path = root / f"{kind}_{rate}"
    if not (path / "summary.json").is_file():
        return None
    run = load_run(path)
    server = run.summary.get("server_metrics") or {}
    split = run.summary.get("ttft_split")
    if split is None and server and run.metrics["completed"]:
        split = ttft_split(run.metrics["mean_ttft_ms"], server)
    return run.metrics | {"server_ttft_ms": server.get("mean_time_to_first_token_ms"),
                          "ttft_split": split, "pacing_late_ms": server.get("mean_pacing_lateness_ms"),
                          "pacing_steps": server.get("pacing_lateness_count")}


def print_split(rate: str, kind: str, m: dict, offline_ttft_ms: float | None) -> dict | None:
    """One line: the client's mean TTFT as client + server stages; with an offline run of
    the same trace, HTTP's cost on it as (engine in the server - offline) + the server's
    HTTP path + the client and transport."""
    split = m["ttft_split"]
    if split is None:
        return None
    line = (f"{rate:>5} {kind + ' ttft':>11}  {m['mean_ttft_ms']:.2f} ms = client+transport "
            f"{split['client_ms']:.2f} + prepare {split['prepare_ms']:.2f} + engine "
            f"{split['engine_ms']:.2f} + handoff {split['handoff_ms']:.2f} + write {split['write_ms']:.2f}")
    out = dict(split)
    if m.get("pacing_late_ms") is not None:      # the twin: how late its steps left
        out["pacing_late_ms"] = m["pacing_late_ms"]
    if offline_ttft_ms is not None:
        out["cost_ms"] = m["mean_ttft_ms"] - offline_ttft_ms
        out["engine_vs_offline_ms"] = split["engine_ms"] - offline_ttft_ms
        line += (f"; cost +{out['cost_ms']:.2f} = engine {out['engine_vs_offline_ms']:+.2f} + server "
                 f"HTTP {split['server_http_ms']:.2f} + client {split['client_ms']:.2f}")
    if "pacing_late_ms" in out:
        line += f"; the twin's steps left {1e3 * out['pacing_late_ms']:.0f} us late (mean over {m['pacing_steps']} steps)"
    print(line)
    return out


def main(root: str) -> dict:
    root = Path(root)
    rates = sorted({p.name.rsplit("_", 1)[1] for kind in KINDS for p in root.glob(f"{kind}_*")},
                   key=float)
    head = (f"{'rate':>5} {'run':>11} {'done':>5} {'tok/s':>8} " +
            " ".join(f"{s + ' ttft':>11}" for s in STATS) + " " +
            " ".join(f"{s + ' tpot':>11}" for s in STATS))
    print(head)
    report = {"bench": "http_vs_offline", "rates": {}}
    for rate in rates:
        runs = {k: metrics(root, k, rate) for k in KINDS}
        for kind, m in runs.items():
            if m is None:
                continue
            print(f"{rate:>5} {kind:>11} {m['completed']:>5} {m['output_throughput']:>8.0f} " +
                  " ".join(f"{m[f'{s}_ttft_ms']:>11.2f}" for s in STATS) + " " +
                  " ".join(f"{m[f'{s}_tpot_ms']:>11.3f}" for s in STATS))
        row = {k: {key: m[key] for key in ("completed", "failed", "output_throughput",
                                            *(f"{s}_{x}_ms" for s in STATS for x in ("ttft", "tpot")))}
               for k, m in runs.items() if m is not None}
        off, http, sim = runs["offline"], runs["http"], runs["sim"]
        splits = {}
        for kind in HTTP_KINDS:     # vs the offline run of the same executor
            base = runs["simoff"] if kind.startswith("sim") else off
            if runs[kind] is not None:
                split = print_split(rate, kind, runs[kind], base["mean_ttft_ms"] if base else None)
                if split is not None:
                    splits[kind] = split
        if splits:
            row["ttft_split"] = splits
        inproc = runs["http_inproc"]
        if off and inproc:
            row["http_inproc_cost"] = {
                "mean_ttft_added_ms": inproc["mean_ttft_ms"] - off["mean_ttft_ms"],
                "mean_tpot_added_pct": 100 * (inproc["mean_tpot_ms"] / off["mean_tpot_ms"] - 1)}
            print(f"{rate:>5} {'inproc':>11}  TTFT +{row['http_inproc_cost']['mean_ttft_added_ms']:.2f} ms "
                  f"mean; TPOT {row['http_inproc_cost']['mean_tpot_added_pct']:+.2f} % mean (engine "
                  "in the server's process)")
        if off and http:
            row["http_cost"] = {
                **{f"{s}_ttft_added_ms": http[f"{s}_ttft_ms"] - off[f"{s}_ttft_ms"] for s in STATS},
                **{f"{s}_tpot_added_pct": 100 * (http[f"{s}_tpot_ms"] / off[f"{s}_tpot_ms"] - 1)
                   for s in STATS}}
            cost = row["http_cost"]
            row["http_within_target"] = (max(cost["mean_ttft_added_ms"], cost["median_ttft_added_ms"]) <= 10
                                         and max(cost["mean_tpot_added_pct"], cost["median_tpot_added_pct"]) <= 5)
            if http["server_ttft_ms"] is not None:
                cost["server_mean_ttft_added_ms"] = http["server_ttft_ms"] - off["mean_ttft_ms"]
                print(f"{rate:>5} {'server':>11}  mean TTFT {http['server_ttft_ms']:.2f} ms inside the "
                      f"server (/metrics, from its arrival stamp): {cost['server_mean_ttft_added_ms']:+.2f} ms on offline, "
                      f"HTTP and the client {http['mean_ttft_ms'] - http['server_ttft_ms']:.2f} ms")
            print(f"{rate:>5} {'http-off':>11}  TTFT +{cost['mean_ttft_added_ms']:.2f} ms mean, "
                  f"+{cost['median_ttft_added_ms']:.2f} ms median; TPOT {cost['mean_tpot_added_pct']:+.2f} % mean, "
                  f"{cost['median_tpot_added_pct']:+.2f} % median -> "
                  f"{'within' if row['http_within_target'] else 'OUTSIDE'} target (<= 10 ms, <= 5 %)")
        if sim and http:
            row["twin_vs_http_rel_err"] = {f"{s}_{x}": sim[f"{s}_{x}_ms"] / http[f"{s}_{x}_ms"] - 1
                                           for s in ("mean", "median") for x in ("ttft", "tpot")}
            err = row["twin_vs_http_rel_err"]
            print(f"{rate:>5} {'sim-http':>11}  TTFT {100 * err['mean_ttft']:+.1f} % mean, TPOT "
                  f"{100 * err['mean_tpot']:+.1f} % mean (twin over HTTP vs engine over HTTP)")
        simoff = runs["simoff"]
        if sim and simoff:
            row["twin_http_vs_offline"] = {
                "mean_ttft_added_ms": sim["mean_ttft_ms"] - simoff["mean_ttft_ms"],
                "mean_tpot_added_pct": 100 * (sim["mean_tpot_ms"] / simoff["mean_tpot_ms"] - 1)}
            d = row["twin_http_vs_offline"]
            print(f"{rate:>5} {'sim-off':>11}  TTFT +{d['mean_ttft_added_ms']:.2f} ms mean; TPOT "
                  f"{d['mean_tpot_added_pct']:+.2f} % mean (the twin over HTTP vs offline: the HTTP path)")
        hits = {k: m["prefix_cache_hit_rate"] for k, m in runs.items() if m is not None}
        if hits and max(hits.values()) - min(hits.values()) > 0.05:
            row["prefix_cache_mismatch"] = hits
            print(f"{rate:>5} {'WARNING':>11}  prefix-cache hit rates differ (" +
                  ", ".join(f"{k} {100 * v:.1f} %" for k, v in hits.items()) + "): a run that "
                  "found the trace cached is not comparable (bench --reset-prefix-cache)")
        report["rates"][rate] = row
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/runs")
