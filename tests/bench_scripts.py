"""The benchmark scripts the tests exercise (benchmarks/ is not a package: its scripts run
as files), loaded by path once per test session."""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load(relpath: str):
    """The module of the script at `relpath` under the repository root, e.g.
    load("benchmarks/fidelity/run_fidelity.py"); every test gets the same module object."""
    name = "bench_" + Path(relpath).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / relpath)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return sys.modules[name]
