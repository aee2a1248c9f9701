"""Reads result files (requests.parquet, steps.parquet, summary.json) and turns them into
metrics, tables and figures. Needs only numpy, pandas, pyarrow and matplotlib: no torch,
simpy, engine or simulator, so results can be studied on any laptop."""
