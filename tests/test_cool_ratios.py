"""The clock's effect as the calibration profile measures it (simulator.calibrate.cool_ratios):
shapes timed right after light decode steps against back to back, by prompt tokens."""
import math

import pandas as pd

from simulator.calibrate import cool_ratios, print_cool_ratios


def test_cool_over_hot_by_prompt_tokens(capsys):
    rows = []
    for tokens, ratio in ((512, 0.99), (768, 0.97), (1536, 0.96), (3072, 0.92), (8192, 0.90)):
        for k in range(3):
            rows.append({"num_prefill_tokens": tokens, "device_s": 1e-2 * (k + 1),
                         "device_cool_s": 1e-2 * (k + 1) * ratio})
    rows.append({"num_prefill_tokens": 16, "device_s": 1e-3, "device_cool_s": math.nan})   # not timed cool
    table = cool_ratios(pd.DataFrame(rows))
    got = dict(zip(table["prompt_tokens"], table["median"]))
    assert list(got) == ["<1k", "1-2k", "2-4k", ">=4k"]
    assert abs(got["<1k"] - 0.98) < 1e-9      # the median of 0.99 and 0.97, three of each
    assert abs(got[">=4k"] - 0.90) < 1e-9 and table["n"].tolist() == [6, 3, 3, 3]
    print_cool_ratios(table)
    assert "timed cool" in capsys.readouterr().out
    # a profile made before the column, or with no shape timed cool: nothing to say
    assert cool_ratios(pd.DataFrame(rows).drop(columns=["device_cool_s"])).empty
    assert cool_ratios(pd.DataFrame(rows[-1:])).empty
