"""benchmarks/profile_memory.py reads torch's allocator snapshot: only segments that hold both
free space and live blocks keep memory from the KV pool, and their free bytes are charged to
the sites of those live blocks by size."""
from tests.bench_scripts import load

pm = load("benchmarks/profile_memory.py")


def frame(path, line, name):
    return {"filename": path, "line": line, "name": name}


def block(size, state, where=None):
    return {"size": size, "state": state, "frames": [frame(f"/repo/engine/{where}.py", 7, "f"),
                                                     frame("/usr/lib/python3/torch/x.py", 1, "g")] if where else []}


def test_segments_that_pin_free_space_and_who_pins_it():
    snapshot = {"segments": [
        {"total_size": 100, "blocks": [block(100, "active_allocated", "weights")]},           # full
        {"total_size": 100, "blocks": [block(100, "inactive")]},                              # all free
        {"total_size": 100, "blocks": [block(10, "active_allocated", "workspace"), block(90, "inactive")]},
        {"total_size": 200, "blocks": [block(30, "active_allocated", "workspace"),
                                       block(10, "active_allocated", "scratch"), block(160, "inactive")]},
    ]}
    segments = pm.pinned_segments(snapshot)
    assert [s["free"] for s in segments] == [160, 90]          # largest first, only mixed segments
    by_site = pm.pinned_by_site(segments)
    assert sum(by_site.values()) == 250
    workspace = next(v for k, v in by_site.items() if "workspace.py" in k)
    scratch = next(v for k, v in by_site.items() if "scratch.py" in k)
    assert workspace == 90 + 160 * 30 / 40 and scratch == 160 * 10 / 40
    assert all("torch" not in k for k in by_site)              # the repository's frames only
