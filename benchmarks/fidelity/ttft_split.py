"""Where a simulated run's TTFT differs from the real runs of the same cell: each request's time to
first token cut at the step loop's events, real (mean over the repeats) against simulated.

    python benchmarks/fidelity/ttft_split.py --sim <sim run dir> <real run dir> [<real run dir> ...]
        [--by prompt_len [--bins 4]]

Run directories are run.py's (or run_fidelity.py's `real/<cell>/r<k>` and `sim/<model>/<cell>`):
requests.parquet and steps.parquet. A request's first token comes with step S (the step whose
tokens were received at its first_token_s); its TTFT is the sum of
- queue: arrival to the forming of the first step that schedules it (waiting for the step loop:
  the step in flight, its host work, the admission of the requests before it);
- earlier chunks: from there to the forming of S (a prompt cut over several steps);
- host window: S formed to S launched (scheduling, the admission of requests that arrived since
  the step before, packing the inputs, the launch);
- device: S's device time;
- behind and receive: the rest, launch to tokens (S waiting on the device for the step before it,
  and the host's receive of S's tokens after forming and launching the next step).
Prints per component the real and simulated mean (ms) and the difference as a share of the real
mean TTFT (the components' differences add up to the TTFT error). `--by prompt_len` adds one row
per prompt-length quantile bin (`--bins`, by the requests' prompt lengths): its requests' mean TTFT
real and simulated and each component's difference (sim - real, ms; each request's real parts
are its mean over the repeats); and the error over the requests whose first-token step holds
the same prompt tokens in both runs (`same_first_step`: the rest joined another prompt's step in
one executor only). The last line is JSON. No GPU.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

COMPONENTS = ("queue", "earlier_chunks", "host_window", "device", "behind_and_receive")


def split(run_dir: Path) -> pd.DataFrame:
    """One row per request with a first token: ttft and COMPONENTS (seconds). Raises ValueError
    if a first token matches no step's received tokens (not a step-recorded run)."""
    requests = pd.read_parquet(run_dir / "requests.parquet")
    requests = requests[requests["first_token_s"].notna()].reset_index(drop=True)
    steps = pd.read_parquet(run_dir / "steps.parquet")
    steps = steps[steps["tokens_s"].notna()].sort_values("tokens_s").reset_index(drop=True)
    received = steps["tokens_s"].to_numpy(float)
    i = np.clip(np.searchsorted(received, requests["first_token_s"].to_numpy(float) - 1e-9), 0, len(steps) - 1)
    s = steps.iloc[i].reset_index(drop=True)
    if not np.allclose(s["tokens_s"], requests["first_token_s"], rtol=0, atol=1e-6):
        raise ValueError(f"{run_dir}: first tokens do not match the steps' received tokens")
    return pd.DataFrame({
        "request_id": requests["request_id"],
        "prompt_len": requests["prompt_len"] if "prompt_len" in requests else np.nan,
        "ttft": requests["first_token_s"] - requests["arrival_s"],
        "queue": requests["first_scheduled_s"] - requests["arrival_s"],
        "earlier_chunks": s["start_s"] - requests["first_scheduled_s"],
        "host_window": s["launch_s"] - s["start_s"],
        "device": s["device_s"],
        "behind_and_receive": s["tokens_s"] - s["launch_s"] - s["device_s"],
        "first_step_prompt_tokens": s["num_prefill_tokens"] if "num_prefill_tokens" in s else np.nan})


def compare(real_dirs: list[Path], sim_dir: Path) -> dict:
    """{"ttft_real_ms", "ttft_sim_ms", "error", component: {"real_ms", "sim_ms", "share"}} with
    share = (sim - real) / real mean TTFT; the real means are the repeats' mean."""
    real = pd.concat([split(d).mean(numeric_only=True) for d in real_dirs], axis=1).mean(axis=1)
    sim = split(sim_dir).mean(numeric_only=True)
    out = {"ttft_real_ms": 1e3 * real["ttft"], "ttft_sim_ms": 1e3 * sim["ttft"],
           "error": sim["ttft"] / real["ttft"] - 1}
    for c in COMPONENTS:
        out[c] = {"real_ms": 1e3 * real[c], "sim_ms": 1e3 * sim[c], "share": (sim[c] - real[c]) / real["ttft"]}
    return out


def same_first_step(real_dirs: list[Path], sim_dir: Path) -> dict | None:
    """The mean TTFT error over the requests whose first-token step holds the same prompt tokens
    in the simulated run as on the engine. A request arriving within a step's host window may
    join a long prompt's step in one executor and not in the other; at light load a few such
    arrivals move a cell's mean TTFT by several per cent. Per real repeat: those requests and
    the error of their mean TTFT, averaged over the repeats: {"requests", "of", "error"}. None
    for runs recorded without num_prefill_tokens. Raises ValueError if the runs do not hold the
    same requests."""
    sim = split(sim_dir).set_index("request_id")
    if sim["first_step_prompt_tokens"].isna().all():
        return None
    same_n, errors = [], []
    for d in real_dirs:
        real = split(d).set_index("request_id")
        if set(real.index) != set(sim.index):
            raise ValueError(f"{sim_dir} and {d} do not hold the same requests")
        s = sim.loc[real.index]
        same = (real["first_step_prompt_tokens"] == s["first_step_prompt_tokens"]).to_numpy()
        same_n.append(int(same.sum()))
        errors.append(s["ttft"][same].mean() / real["ttft"][same].mean() - 1 if same.any() else np.nan)
    return {"requests": float(np.mean(same_n)), "of": len(sim), "error": float(np.nanmean(errors))}


def by_prompt_len(real_dirs: list[Path], sim_dir: Path, bins: int) -> pd.DataFrame:
    """One row per prompt-length quantile bin: `prompt_len` (the bin), `n`, ttft_real_ms,
    ttft_sim_ms, error, and per component its sim - real mean over the bin's requests (ms).
    Raises ValueError if the runs carry no prompt_len or do not hold the same requests."""
    real = pd.concat([split(d) for d in real_dirs]).groupby("request_id").mean(numeric_only=True)
    sim = split(sim_dir).set_index("request_id")
    if real["prompt_len"].isna().any():
        raise ValueError(f"{real_dirs[0]}: requests.parquet has no prompt_len")
    if set(real.index) != set(sim.index):
        raise ValueError(f"{sim_dir} and the real runs do not hold the same requests")
    sim = sim.loc[real.index]
    group = pd.qcut(real["prompt_len"], bins, duplicates="drop")
    rows = []
    for interval, idx in real.groupby(group, observed=True).groups.items():
        r, s = real.loc[idx].mean(), sim.loc[idx].mean()
        rows.append({"prompt_len": f"{int(np.ceil(interval.left))}-{int(interval.right)}", "n": len(idx),
                     "ttft_real_ms": 1e3 * r["ttft"], "ttft_sim_ms": 1e3 * s["ttft"],
                     "error": s["ttft"] / r["ttft"] - 1,
                     **{c: 1e3 * (s[c] - r[c]) for c in COMPONENTS}})
    return pd.DataFrame(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("real", nargs="+", type=Path, help="real run directories (repeats of one cell)")
    ap.add_argument("--sim", required=True, type=Path, help="the simulated run of the same cell")
    ap.add_argument("--by", choices=["prompt_len"], default=None,
                    help="also split the requests into prompt-length quantile bins")
    ap.add_argument("--bins", type=int, default=4, help="bins of --by (default 4)")
    args = ap.parse_args(argv)
    if args.bins < 1:
        sys.exit(f"ttft_split: --bins must be >= 1, got {args.bins}")
    try:
        r = compare(args.real, args.sim)
        bins = by_prompt_len(args.real, args.sim, args.bins) if args.by else None
        same = same_first_step(args.real, args.sim)
    except (OSError, ValueError, KeyError) as e:
        sys.exit(f"ttft_split: {e}")
    print(f"mean TTFT real {r['ttft_real_ms']:.2f} ms, sim {r['ttft_sim_ms']:.2f} ms: error {100 * r['error']:+.2f}%")
    print(f"{'component':<20} {'real ms':>9} {'sim ms':>9} {'(sim - real) / real TTFT':>26}")
    for c in COMPONENTS:
        print(f"{c:<20} {r[c]['real_ms']:>9.2f} {r[c]['sim_ms']:>9.2f} {100 * r[c]['share']:>+25.2f}%")
    out = {k: (round(v, 5) if isinstance(v, float) else {a: round(b, 5) for a, b in v.items()})
           for k, v in r.items()}
    if same is not None:
        print(f"requests whose first-token step holds the same prompt tokens in the sim: {same['requests']:.1f} of "
              f"{same['of']} (mean over the repeats); their mean TTFT error {100 * same['error']:+.2f}%")
        out["same_first_step"] = {k: round(v, 5) for k, v in same.items()}
    if bins is not None:
        print("\nby prompt length: mean TTFT (ms) and each part's sim - real (ms)")
        print(f"{'prompt_len':>11} {'n':>4} {'real':>7} {'sim':>7} {'error':>7} "
              + " ".join(f"{c[:12]:>12}" for c in COMPONENTS))
        for b in bins.itertuples(index=False):
            print(f"{b.prompt_len:>11} {b.n:>4} {b.ttft_real_ms:>7.2f} {b.ttft_sim_ms:>7.2f} "
                  f"{100 * b.error:>+6.1f}% " + " ".join(f"{getattr(b, c):>+12.3f}" for c in COMPONENTS))
        out["by_prompt_len"] = bins.round(5).to_dict(orient="records")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
