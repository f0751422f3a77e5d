"""Shared test fixtures."""
import os
from pathlib import Path

import numpy as np
import pytest

# Fake host devices for the sharding tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# Share compiled programs across tests and with the CLI subprocesses they start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "echo_ode_jax_tests_jit"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")


def camus_dir() -> Path:
  """The shared CAMUS copy next to the repository (override: ECHO_ODE_CAMUS_DIR)."""
  env = os.environ.get("ECHO_ODE_CAMUS_DIR")
  if env:
    return Path(env)
  return Path(__file__).resolve().parents[2] / "shared" / "data" / "camus_4ch_edes"


@pytest.fixture
def rng(request):
  """A fresh random generator per test (seeded from the test name, reproducible)."""
  seed = abs(hash(request.node.nodeid)) % (2**32)
  return np.random.default_rng(seed)
