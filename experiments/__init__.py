"""Wires a configuration to one executor (simulator or engine), replays a trace on it and
writes the run's results: `run.py` is the entry point, `replay.run` the whole pipeline."""
