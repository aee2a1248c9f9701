"""The shipped hardware files' attention cost by KV block size agrees with how the engine's
prefill kernel walks the cache: from the block size at which its key tile fits inside one
block (TILE_IN_PAGE: one block-table lookup per tile), every larger block runs the same code,
so those sizes must cost alike."""
import pathlib

import pytest
import yaml

from engine.kernels.launch import PrefillLaunch
from simulator.hardware import HardwareSpec

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = sorted([*ROOT.glob("conf/hardware/*.yaml"), *ROOT.glob("simulator/calibrations/*.hardware.yaml"),
                *ROOT.glob("simulator/calibrations/leave_one_out/*.yaml")])


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_prefill_blocks_on_one_kernel_path_cost_alike(path):
    hw = HardwareSpec(**yaml.safe_load(path.read_text()))
    table = hw.attention_block_cost.get("prefill")
    if not table:
        pytest.skip("no prefill block costs in this file")
    tile = PrefillLaunch().block_n
    in_page = [cost for block, cost in table.items() if block % tile == 0]
    if len(in_page) < 2:
        pytest.skip(f"fewer than two measured block sizes that hold a {tile}-key tile")
    assert max(in_page) / min(in_page) <= 1.03, (
        f"{path.name}: prefill block costs at multiples of {tile} differ by more than 3%: "
        f"{ {b: c for b, c in table.items() if b % tile == 0} }")


def test_the_check_fails_on_the_old_h200_table():
    """The table shipped before (block 64 from one outlying point) is what the check catches."""
    old = {1: 1.16, 2: 1.005, 4: 1.01, 8: 1.008, 16: 1.0, 32: 1.014, 64: 1.021, 128: 0.954, 256: 0.957}
    tile = PrefillLaunch().block_n
    in_page = [cost for block, cost in old.items() if block % tile == 0]
    assert max(in_page) / min(in_page) > 1.03
