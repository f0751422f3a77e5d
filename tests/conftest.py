"""Shared test fixtures."""
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

# Fake host devices for the sharding tests; must be set before JAX starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
# Share compiled programs across tests and with the CLI subprocesses they start.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.path.expanduser("~"), ".cache", "echo_ode_jax_tests_jit"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
# The CLI subprocesses skip cpu_malloc's restart (one more interpreter start and
# JAX import each); tests/test_cpu_malloc.py runs it.
os.environ.setdefault("ECHO_ODE_MALLOC", "default")
# Native kernels wherever they apply, without timing them (kernels.cpu.autotune):
# the same programs on every host and run; tests/test_autotune.py covers the choice.
os.environ.setdefault("ECHO_ODE_NATIVE", "on")


def pytest_configure(config):
  """Full float32 convolutions and matmuls off CPU.

  Tests compare formulations of the same function (batched knots against the
  in-loop reference, vmap against single fits) at float32 tolerances. A GPU
  computes float32 convolutions in TF32 by default (10-bit mantissa), which
  moves those comparisons by ~1e-3 (seen on an H100: 4e-3 pixels of phi);
  with "highest" they pass there. XLA:CPU has no TF32, so CPU runs are left as
  they are.
  """
  import jax
  if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")


def camus_dir() -> Path:
  """The shared CAMUS copy next to the repository (override: ECHO_ODE_CAMUS_DIR)."""
  env = os.environ.get("ECHO_ODE_CAMUS_DIR")
  if env:
    return Path(env)
  return Path(__file__).resolve().parents[2] / "shared" / "data" / "camus_4ch_edes"


@pytest.fixture
def rng(request):
  """A fresh random generator per test (seeded from the test name, reproducible)."""
  seed = zlib.crc32(request.node.nodeid.encode())  # hash() is salted per process
  return np.random.default_rng(seed)
