import os

# Triton picks interpreter or compiler when first imported: decide before any test imports
# it. CPU CI interprets the kernels; on a GPU run with TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

# CI=1 selects hypothesis' deterministic profile (derandomized, no deadline).
settings.register_profile("ci", settings.get_profile("ci"), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")
