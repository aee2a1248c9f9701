"""The project command: `twinserve run|serve|bench|analyze|calibrate|checkpoint` (cli.py).
The project's code lives in the top-level packages (policy, engine, simulator, traces,
experiments, analysis); this package holds only the command and, once installed, the
Hydra configs (conf/ of the repository, shipped here as twinserve/conf)."""
