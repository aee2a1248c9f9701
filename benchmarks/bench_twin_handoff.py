"""The simulated server's own hand-off, without HTTP: the twin in its process
(server.process.sim_process, as `python -m server --backend sim` runs it) fed a Poisson
trace from this process, which receives its steps as the server does. Per finished
request: the receipt of its last token here minus the twin's time for it (its token time,
on perf_counter: one clock for both processes): the twin's wake-up, its message work, the
pipe and the unpickling. And the twin's own lateness at send (twinserve:pacing_lateness).

    python benchmarks/bench_twin_handoff.py [--rate 24] [--num-requests 150]

Prints one line and a JSON line. On a loaded CPU the tail is the twin waiting for a core.
"""
import argparse
import json
import random
import select
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from server.backend import GenerationParams  # noqa: E402
from server.process import sim_process  # noqa: E402

CALIBRATION = Path(__file__).resolve().parents[1] / "simulator/calibrations/qwen3-0.6b-h200-tp1.json"


def trace(rate: float, n: int, seed: int = 0) -> list[tuple]:
    """(arrival offset s, id, prompt ids, output tokens): Poisson arrivals, prompts of
    100-1500 ids, outputs of 20-300 tokens."""
    rng, t, out = random.Random(seed), 0.0, []
    for i in range(n):
        t += rng.expovariate(rate)
        out.append((t, f"r{i}", [rng.randrange(1, 150000) for _ in range(rng.randint(100, 1500))],
                    rng.randint(20, 300)))
    return out


def run(rate: float, n: int) -> dict:
    backend = sim_process("qwen3-0.6b", "h200", cost_model="fitted", calibration=str(CALIBRATION))
    requests, handoff, late, i = trace(rate, n), [], [], 0
    start = time.perf_counter() + 0.2
    try:
        while i < len(requests) or backend.has_unfinished():
            now = time.perf_counter()
            while i < len(requests) and start + requests[i][0] <= now:
                _, request_id, prompt, max_tokens = requests[i]
                backend.add(request_id, prompt, GenerationParams(max_tokens=max_tokens))
                i += 1
            timeout = max(0.0, start + requests[i][0] - now) if i < len(requests) else 1.0
            if not backend.has_unfinished():
                time.sleep(timeout)
            elif select.select([backend.step_fd], [], [], timeout)[0]:
                for f in backend.step():
                    handoff.append(time.perf_counter() - f.token_times[-1])
                late += backend.take_lateness()
    finally:
        backend.close()
    ms = sorted(1e3 * h for h in handoff)
    return {"bench": "twin_handoff", "rate": rate, "requests": len(ms),
            "median_ms": statistics.median(ms), "mean_ms": statistics.mean(ms),
            "p90_ms": ms[int(0.9 * len(ms))], "late_mean_ms": 1e3 * statistics.mean(late),
            "late_steps": len(late)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=24.0, help="requests per second (default 24)")
    p.add_argument("--num-requests", type=int, default=150, help="requests (default 150)")
    args = p.parse_args()
    if args.rate <= 0 or args.num_requests < 1:
        p.error("--rate must be > 0 and --num-requests >= 1")
    r = run(args.rate, args.num_requests)
    print(f"twin hand-off at {r['rate']:g} req/s, {r['requests']} requests: median "
          f"{r['median_ms']:.2f} ms, mean {r['mean_ms']:.2f}, p90 {r['p90_ms']:.2f}; the twin's "
          f"lateness at send {r['late_mean_ms']:.2f} ms mean over {r['late_steps']} steps")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
