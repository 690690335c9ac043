"""Shared pytest setup: hypothesis profiles and hardware markers."""

import os

# Eight CPU devices for the mesh tests (sharded training, context-parallel
# attention); single-device code runs on the first one as before. Must be set
# before JAX initialises its backends.
if "xla_force_host_platform_device_count" not in os.environ.get(
    "XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8"
                             ).strip()

import hypothesis  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

# CI runs with CI=true: fewer examples, no deadline (compilation dominates).
hypothesis.settings.register_profile(
    "ci", max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "dev", max_examples=25, deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
  backend = jax.default_backend()
  for item in items:
    for marker, needed in (("gpu", "gpu"), ("tpu", "tpu")):
      if marker in item.keywords and backend != needed:
        item.add_marker(pytest.mark.skip(
            reason=f"needs a {needed.upper()} (backend is {backend})"))
