"""Where the device memory that the KV pool cannot have sits when the engine sizes it (GPU).

Loads a checkpoint with torch's allocator history on, and right before the pool is sized
(ModelRunner.allocate_kv_cache) prints ModelRunner.memory's split and every allocator segment
with cached free space: its size, how much of it is free, and the allocations that keep it
(their sizes and the Python frames that made them). A segment whose free part the pool
cannot use (the pool is one tensor) stays reserved as long as one block in it lives.

    python benchmarks/profile_memory.py --model /tmp/twinserve-llama-3.1-8b-gptq [--top 12]

Ends with one JSON line: the split, and the pinned free bytes by allocation site.
"""
import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine import LLM  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402

GB = 1e9


def site(frames: list[dict], depth: int = 3) -> str:
    """The innermost `depth` frames of the repository's own code that made an allocation."""
    own = [f for f in frames if "/engine/" in f["filename"] or "/benchmarks/" in f["filename"]]
    return " <- ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in own[:depth]) or "?"


def pinned_segments(snapshot: dict) -> list[dict]:
    """Segments with cached free space, largest free first: size, free, and their live blocks."""
    out = []
    for seg in snapshot["segments"]:
        free = sum(b["size"] for b in seg["blocks"] if b["state"] == "inactive")
        live = [b for b in seg["blocks"] if b["state"] == "active_allocated"]
        if free and live:
            out.append({"size": seg["total_size"], "free": free, "live": live})
    return sorted(out, key=lambda s: -s["free"])


def pinned_by_site(segments: list[dict]) -> dict[str, int]:
    """Each segment's free bytes charged to its live blocks in proportion to their sizes,
    summed by the site that allocated them: what keeps how much of torch's cache."""
    by_site = defaultdict(float)
    for s in segments:
        live = sum(b["size"] for b in s["live"])
        for b in s["live"]:
            by_site[site(b.get("frames", []))] += s["free"] * b["size"] / live
    return dict(by_site)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--top", type=int, default=12, help="segments to list")
    ap.add_argument("--max-model-len", type=int, default=4096)
    args = ap.parse_args()
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    seen = {}
    allocate = ModelRunner.allocate_kv_cache

    def sized(self, activation_bytes):
        torch.cuda.synchronize(self.device)
        seen["snapshot"] = torch.cuda.memory._snapshot(self.device)
        seen["reserved"] = torch.cuda.memory_reserved(self.device)
        seen["allocated"] = torch.cuda.memory_allocated(self.device)
        return allocate(self, activation_bytes)

    ModelRunner.allocate_kv_cache = sized
    with LLM(args.model, max_model_len=args.max_model_len) as llm:
        memory = {k: (v / GB if k != "utilization" else v) for k, v in llm.model_runner.memory.items()}
    print("memory GB at KV sizing: " + ", ".join(f"{k} {v:.2f}" for k, v in memory.items()))
    segments = pinned_segments(seen["snapshot"])
    by_site = sorted(pinned_by_site(segments).items(), key=lambda kv: -kv[1])[:args.top]
    print(f"\n{len(segments)} segments hold {sum(s['free'] for s in segments) / GB:.2f} GB free beside live blocks "
          f"(reserved {seen['reserved'] / GB:.2f}, allocated {seen['allocated'] / GB:.2f})")
    print(f"{'segment MB':>11} {'free MB':>9} {'live':>5}  largest live blocks (MB) and their sites")
    for s in segments[:args.top]:
        live = sorted(s["live"], key=lambda b: -b["size"])[:3]
        print(f"{s['size'] / 1e6:11.1f} {s['free'] / 1e6:9.1f} {len(s['live']):5d}  "
              + "; ".join(f"{b['size'] / 1e6:.1f} {site(b.get('frames', []))}" for b in live))
    print("\nfree bytes pinned, by the site of the blocks that pin them (GB)")
    for name, nbytes in by_site:
        print(f"  {nbytes / GB:7.3f}  {name}")
    print(json.dumps({"model": args.model, "memory_GB": memory,
                      "pinned_GB": {k: round(v / GB, 4) for k, v in by_site}}))


if __name__ == "__main__":
    main()
