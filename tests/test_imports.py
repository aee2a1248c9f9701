"""Start-up cost: the policy and simulator hot paths, and a run that logs nothing, load no
table, plotting or logging library (pandas alone costs ~0.35 s, matplotlib ~0.4 s)."""
import subprocess
import sys

import pytest

HEAVY = ("pandas", "matplotlib", "wandb")


def loaded_after(statement: str) -> set[str]:
    """Which of HEAVY a fresh interpreter has loaded after running `statement`."""
    code = f"import sys\n{statement}\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


@pytest.mark.parametrize("statement", [
    "import policy, simulator",
    "from simulator import Simulator, build_cost_model, kv_pool_blocks",
])
def test_hot_paths_import_no_heavy_library(statement):
    assert loaded_after(statement) == set()


def test_logging_imports_plotting_only_to_draw():
    assert "matplotlib" not in loaded_after("import experiments.logging")
    assert "wandb" not in loaded_after("from experiments.logging import make_logger")
