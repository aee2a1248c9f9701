"""The clock's effect as the calibration profile measures it (simulator.calibrate.clock_ratios):
prompt shapes timed right after light decode steps (cool) and shapes timed after the device
sat idle (cold), each against its back-to-back time."""
import math

import pandas as pd

from simulator.calibrate import clock_ratios, print_clock_ratios


def test_cool_by_prompt_tokens_and_cold_by_kind(capsys):
    rows = []
    for tokens, ratio in ((512, 0.99), (768, 0.97), (1536, 0.96), (3072, 0.92), (8192, 0.90)):
        for k in range(3):
            rows.append({"kind": "mixed", "num_prefill_tokens": tokens, "device_s": 1e-2 * (k + 1),
                         "device_cool_s": 1e-2 * (k + 1) * ratio, "device_cold_s": 1e-2 * (k + 1) * 1.05})
    rows.append({"kind": "decode", "num_prefill_tokens": 0, "device_s": 1e-3, "device_cool_s": math.nan,
                 "device_cold_s": 1.2e-3})
    rows.append({"kind": "decode", "num_prefill_tokens": 0, "device_s": 1e-3, "device_cool_s": math.nan,
                 "device_cold_s": math.nan})                                    # timed neither way
    table = clock_ratios(pd.DataFrame(rows))
    cool = table[table["timing"] == "cool"]
    got = dict(zip(cool["group"], cool["median"]))
    assert list(got) == ["<1k", "1-2k", "2-4k", ">=4k"] and cool["n"].tolist() == [6, 3, 3, 3]
    assert abs(got["<1k"] - 0.98) < 1e-9 and abs(got[">=4k"] - 0.90) < 1e-9    # 0.99 and 0.97, three each
    cold = table[table["timing"] == "cold"].set_index("group")
    assert cold.loc["decode", "n"] == 1 and abs(cold.loc["decode", "median"] - 1.2) < 1e-9
    assert cold.loc["mixed", "n"] == 15 and abs(cold.loc["mixed", "median"] - 1.05) < 1e-9
    print_clock_ratios(table)
    assert "timed cool" in capsys.readouterr().out
    # a profile made before the columns: nothing to say
    assert clock_ratios(pd.DataFrame(rows).drop(columns=["device_cool_s", "device_cold_s"])).empty
