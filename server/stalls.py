"""Stalls of the engine behind a server: Triton kernels compiled after the warm-up, and the
slowest steps with their shapes.

A Triton kernel launched with a specialization it has not met (another constexpr tile, an
integer argument that is now 1, a pointer no longer 16-byte aligned) compiles on the host
inside the step that launched it: 0.3-1 s on an H200, every stream stalled. The warm-up
(engine.model_runner) is meant to compile every variant a run can meet; `KernelCensus`
checks it: it holds the compiled variants of every @triton.jit kernel of the engine's
modules at the end of the warm-up, and names each one added since, with its constexprs
and what else in its specialization is new. `StallLog` keeps a run's slowest steps and
takes a census only after a step slow enough to hide a compile, so a normal step costs a
comparison.

    census = KernelCensus.of_modules("engine.")    # after the warm-up
    log = StallLog(census)
    log.after_step(record)                          # each step's record (engine.step_records)
    print(log.report("rate 12"))                    # then log.reset()

Triton keeps a kernel's compiled variants per device: `fn.device_caches[device][0]` (a
dict key -> CompiledKernel; Triton 3.x) or `fn.cache[device]` (older). Under
TRITON_INTERPRET=1 kernels are interpreted: nothing compiles, the census is empty.
"""
import ast
import heapq
import sys

SLOW_STEP_S = 0.05      # a step this long may hold a compile: take a census after it
TOP_STEPS = 5           # slowest steps a report lists
SHAPE = ("num_seqs", "num_batched_tokens", "num_prefill_tokens", "num_decode_seqs",
         "num_sampled", "max_context_tokens")


def jit_kernels(prefix: str) -> dict[str, object]:
    """Every Triton JIT function (an object with compiled-variant caches) defined in the
    loaded modules whose name starts with `prefix`: "module.name" -> function."""
    found = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith(prefix) or module is None:
            continue
        for attr, value in list(vars(module).items()):
            try:
                fn = value if is_jit(value) else getattr(value, "fn", None)   # or an autotuner's
            except Exception:
                continue
            if is_jit(fn) and getattr(fn, "module", name) == name:        # where it is defined
                found[f"{name}.{attr}"] = fn
    return found


def is_jit(fn) -> bool:
    """Has Triton's compiled-variant caches (checked by type: some objects, like
    torch.ops, make up any attribute asked for)."""
    try:
        return (isinstance(getattr(fn, "device_caches", None), dict)
                or isinstance(getattr(fn, "cache", None), dict) and hasattr(fn, "arg_names"))
    except Exception:
        return False


def compiled_variants(fn) -> dict[str, object]:
    """A JIT function's compiled variants over every device: cache key -> compiled kernel."""
    out = {}
    caches = getattr(fn, "device_caches", None)
    if caches is not None:                         # Triton 3.x: device -> (kernels, ...)
        for entry in list(caches.values()):
            out.update(entry[0])
    else:                                          # older: device -> {key: kernel}
        for cache in list(getattr(fn, "cache", {}).values()):
            out.update(cache)
    return out


def specialization(key: str) -> list | None:
    """The specialization list at the start of a cache key (`str(specialization) +
    str(options)`: one (type, value) per argument), or None if the key reads otherwise."""
    if not key.startswith("["):
        return None
    depth, quote, i = 0, None, 0
    while i < len(key):
        c = key[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
            if depth == 0:
                try:
                    return list(ast.literal_eval(key[:i + 1]))
                except (ValueError, SyntaxError):
                    return None
        i += 1
    return None


def describe(fn, key: str, kernel, known: list[str]) -> str:
    """A new variant in words: its constexprs, and the arguments whose specialization
    differs from the closest variant in `known` (the warm-up's)."""
    names = list(getattr(fn, "arg_names", []))
    spec = specialization(key)
    if spec is None or len(spec) != len(names):     # read the constexprs off the kernel
        constants = getattr(getattr(kernel, "src", None), "constants", None) or {}
        parts = []
        for k, v in constants.items():
            index = k[0] if isinstance(k, tuple) and len(k) == 1 else k
            name = names[index] if isinstance(index, int) and index < len(names) else index
            parts.append(f"{name}={getattr(v, 'value', v)}")
        return " ".join(parts) or key[:200]
    constexprs = [f"{n}={v}" for n, (t, v) in zip(names, spec) if t == "constexpr"]
    closest = None
    for other in filter(None, map(specialization, known)):
        if len(other) == len(spec):
            diff = [i for i, (a, b) in enumerate(zip(spec, other)) if a != b]
            if closest is None or len(diff) < len(closest[0]):
                closest = (diff, other)
    text = " ".join(constexprs) or "no constexprs"
    if closest is None:
        return text + "; no variant of it compiled in the warm-up"
    changed = [f"{names[i]}: {closest[1][i][1]!r}->{spec[i][1]!r}" if spec[i][0] == closest[1][i][0]
               else f"{names[i]}: {closest[1][i][0]}->{spec[i][0]}" for i in closest[0]]
    return f"{text}; vs the closest warm-up variant: {', '.join(changed) or 'options'}"


class KernelCensus:
    """The compiled variants of a set of JIT functions, taken at construction (the end of
    the warm-up); `new()` lists those compiled since (each reported once)."""

    def __init__(self, kernels: dict[str, object], prefix: str | None = None):
        self.kernels, self.prefix = kernels, prefix
        self.base = {name: list(compiled_variants(fn)) for name, fn in kernels.items()}
        self.seen = {name: set(keys) for name, keys in self.base.items()}
        self.count = self.total()

    @classmethod
    def of_modules(cls, prefix: str = "engine.") -> "KernelCensus":
        return cls(jit_kernels(prefix), prefix)

    def total(self) -> int:
        """Compiled variants of every kernel now (a few dict lengths)."""
        return sum(len(compiled_variants(fn)) for fn in self.kernels.values())

    def new(self) -> list[str]:
        """'kernel: description' for each variant compiled since the last call (also of
        kernels in modules loaded since the census: none of theirs was warmed up)."""
        if self.prefix is not None:
            for name, fn in jit_kernels(self.prefix).items():
                if name not in self.kernels:
                    self.kernels[name], self.base[name], self.seen[name] = fn, [], set()
        out = []
        for name, fn in self.kernels.items():
            for key, kernel in compiled_variants(fn).items():
                if key not in self.seen[name]:
                    self.seen[name].add(key)
                    out.append(f"{name.rsplit('.', 1)[1]}: {describe(fn, key, kernel, self.base[name])}")
        self.count = self.total()
        return out


class StallLog:
    """A run's slowest steps, and the kernels compiled in it (attributed to the step after
    which they were found: a compile makes its step slower than SLOW_STEP_S)."""

    def __init__(self, census: KernelCensus | None):
        self.census = census
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.slowest: list[tuple[float, int, dict]] = []     # a min-heap of TOP_STEPS
        self.compiles: list[str] = []

    def after_step(self, record: dict | None) -> None:
        if record is None:
            return
        self.steps += 1
        duration = record.get("duration_s", 0.0)
        if len(self.slowest) < TOP_STEPS:
            heapq.heappush(self.slowest, (duration, self.steps, record))
        elif duration > self.slowest[0][0]:
            heapq.heapreplace(self.slowest, (duration, self.steps, record))
        if duration > SLOW_STEP_S and self.census is not None:
            self.take_census(f"step {self.steps} ({1e3 * duration:.0f} ms)")

    def take_census(self, where: str) -> None:
        """Record the variants compiled since the last census (never fails a step: a
        census that cannot be read is dropped, saying so in the report)."""
        try:
            if self.census.total() != self.census.count:
                self.compiles += [f"{where}: {c}" for c in self.census.new()]
        except Exception as e:
            self.compiles.append(f"{where}: the census failed ({type(e).__name__}: {e}); stopped")
            self.census = None

    def report(self, title: str) -> str:
        """Lines for the log: compiles since the warm-up (a last census catches any a fast
        step hid), then the slowest steps with their shapes."""
        if self.census is not None:
            self.take_census(f"after step {self.steps}")
        counted = self.census is not None and self.census.kernels
        lines = [f"stalls {title}: {self.steps} steps, {len(self.compiles)} kernel variants "
                 f"compiled after the warm-up" + ("" if counted else " (not counted: no "
                                                  "census of Triton kernels)")]
        lines += [f"  compiled {c}" for c in self.compiles]
        for duration, index, r in sorted(self.slowest, reverse=True):
            shape = " ".join(f"{k}={r[k]}" for k in SHAPE if k in r)
            lines.append(f"  slow step {index}: {1e3 * duration:.1f} ms (device "
                         f"{1e3 * r.get('device_s', float('nan')):.1f}, host "
                         f"{1e3 * r.get('cpu_s', float('nan')):.1f}) {shape}")
        return "\n".join(lines)
