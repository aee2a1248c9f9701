"""The stall detector of the engine's server (server/stalls.py): kernel variants compiled
after the warm-up are found in Triton's own caches and named by what is new in them, and a
run's slowest steps are listed with their shapes. No GPU here: the kernels are real
JITFunction objects of the installed Triton whose caches are filled as a launch fills them
(keys in Triton's format: str(specialization) + str(options))."""
import sys
import types

import pytest

jit = pytest.importorskip("triton.runtime.jit")

from server.stalls import KernelCensus, StallLog, specialization  # noqa: E402

OPTIONS = "CUDAOptions(num_warps=4, num_stages=3, launch_pdl=False)"


def _tile_kernel(x_ptr, n, BLOCK: "tl.constexpr", PDL: "tl.constexpr"):
    pass


def key(n_spec: str, block: int, pdl: bool) -> str:
    return str([("*bf16", "D"), ("i32", n_spec), ("constexpr", block), ("constexpr", pdl)]) + OPTIONS


@pytest.fixture
def module():
    """A loaded module 'fakeengine.kernels' holding one JIT kernel, compiled once (the
    warm-up's variant) on device 0."""
    mod = types.ModuleType("fakeengine.kernels")
    _tile_kernel.__module__ = mod.__name__
    fn = jit.JITFunction(_tile_kernel)
    fn.device_caches[0] = ({key("", 64, False): object()}, {}, None, None, None)
    mod.tile_kernel = fn
    mod.ops = pytest.importorskip("torch").ops     # makes up any attribute: not a kernel
    sys.modules[mod.__name__] = mod
    yield mod
    del sys.modules[mod.__name__]


def compile_variant(fn, k):
    fn.device_caches[0][0][k] = object()


def test_census_names_what_is_new_in_a_variant_compiled_after_the_warm_up(module):
    census = KernelCensus.of_modules("fakeengine.")
    assert list(census.kernels) == ["fakeengine.kernels.tile_kernel"] and census.count == 1
    assert census.new() == []
    compile_variant(module.tile_kernel, key("1", 128, True))     # n == 1, another tile, PDL
    assert census.total() == 2
    (line,) = census.new()
    assert line.startswith("tile_kernel: BLOCK=128 PDL=True")
    assert "BLOCK: 64->128" in line and "PDL: False->True" in line and "n: ''->'1'" in line
    assert "x_ptr" not in line                          # unchanged arguments are not named
    assert census.new() == []                          # each variant is reported once


def test_census_reads_older_tritons_cache_and_unreadable_keys():
    """Triton before device_caches kept fn.cache[device][key]; a key that is not a
    specialization list is shown as it is."""
    mod = types.ModuleType("oldengine.k")
    old = types.SimpleNamespace(cache={0: {"warm": object()}}, module="oldengine.k",
                                arg_names=["x"])
    mod.kern = old
    sys.modules[mod.__name__] = mod
    try:
        census = KernelCensus.of_modules("oldengine.")
        assert census.count == 1
        old.cache[0]["sig-after"] = object()
        assert census.new() == ["kern: sig-after"]
    finally:
        del sys.modules[mod.__name__]


def test_specialization_reads_the_key_up_to_the_options():
    assert specialization(key("D", 16, False)) == [("*bf16", "D"), ("i32", "D"),
                                                   ("constexpr", 16), ("constexpr", False)]
    assert specialization("[('constexpr', 'a]b')]opts") == [("constexpr", "a]b")]
    assert specialization("not a list") is None


def record(duration_s, num_seqs, device_s=0.002):
    return {"duration_s": duration_s, "device_s": device_s, "cpu_s": duration_s - device_s,
            "num_seqs": num_seqs, "num_batched_tokens": num_seqs, "num_prefill_tokens": 0}


def test_stall_log_attributes_a_compile_to_its_slow_step_and_lists_the_slowest(module):
    log = StallLog(KernelCensus.of_modules("fakeengine."))
    for i in range(20):
        log.after_step(record(0.002 + i * 1e-5, num_seqs=i + 1))
    compile_variant(module.tile_kernel, key("", 32, False))
    log.after_step(record(0.31, num_seqs=33))               # the step that compiled it
    log.after_step(record(0.004, num_seqs=7))
    compile_variant(module.tile_kernel, key("", 16, False))  # a fast step hid this one
    log.after_step(record(0.003, num_seqs=8))
    text = log.report("rate 12")
    lines = text.splitlines()
    assert lines[0].startswith("stalls rate 12: 23 steps, 2 kernel variants compiled")
    assert lines[1].startswith("  compiled step 21 (310 ms): tile_kernel: BLOCK=32")
    assert lines[2].startswith("  compiled after step 23: tile_kernel: BLOCK=16")
    slow = [line for line in lines if line.startswith("  slow step")]
    assert len(slow) == 5 and slow[0].startswith("  slow step 21: 310.0 ms") and "num_seqs=33" in slow[0]
    assert "num_seqs=7" in slow[1]                          # then the next slowest, in order
    log.reset()
    log.after_step(record(0.002, num_seqs=1))
    assert log.report("next").startswith("stalls next: 1 steps, 0 kernel variants")


def test_stall_log_without_triton_kernels_says_so():
    log = StallLog(None)
    log.after_step(record(0.5, num_seqs=3))
    assert "not counted" in log.report("cpu").splitlines()[0]


def test_census_counts_kernels_of_modules_loaded_after_it(module):
    census = KernelCensus.of_modules("fakeengine.")
    late = types.ModuleType("fakeengine.late")

    def _late_kernel(y_ptr, BLOCK: "tl.constexpr"):
        pass
    _late_kernel.__module__ = late.__name__
    fn = jit.JITFunction(_late_kernel)
    fn.device_caches[0] = ({str([("*fp32", "D"), ("constexpr", 8)]) + OPTIONS: object()}, {}, None, None, None)
    late.late_kernel = fn
    sys.modules[late.__name__] = late
    try:
        assert census.new() == ["late_kernel: BLOCK=8; no variant of it compiled in the warm-up"]
    finally:
        del sys.modules[late.__name__]
