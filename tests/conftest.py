import os

from hypothesis import HealthCheck, settings

# CI=1 selects hypothesis' deterministic profile (derandomized, no deadline).
settings.register_profile("ci", settings.get_profile("ci"), deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")
