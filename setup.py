"""Which packages a `pip install .` ships (everything else is in pyproject.toml).

The project's top-level folders are its packages, and the Hydra configs in conf/ are
shipped inside the `twinserve` package as twinserve/conf (a mapping pyproject.toml alone
cannot express), so an installed `twinserve run` finds them.
"""
from pathlib import Path

from setuptools import find_packages, setup

TOP_LEVEL = ["policy", "engine", "simulator", "experiments", "traces", "analysis", "server",
             "bench", "twinserve"]
CONF = Path(__file__).resolve().parent / "conf"
conf_packages = ["twinserve.conf"] + [f"twinserve.conf.{d.name}" for d in sorted(CONF.iterdir())
                                      if d.is_dir() and not d.name.startswith((".", "_"))]
packages = find_packages(include=[p for name in TOP_LEVEL for p in (name, f"{name}.*")])
if (CONF.parent / "simulator" / "calibrations").is_dir():
    packages.append("simulator.calibrations")     # data only: calibration files
setup(packages=packages + conf_packages, package_dir={"twinserve.conf": "conf"})
