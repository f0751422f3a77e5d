"""Shared by the benchmark scripts: the reference matmul rate (fit_speed.py, conv.py)
and the config whose programs XLA's cost analysis counts fully (fit_speed.py)."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax import fit


def matmul_gflops(n: int = 2048, repeats: int = 10) -> float:
  """GFLOP/s of an n x n float32 matmul under jit: the fastest of `repeats`
  calls, i.e. the rate this host reaches (the median swung by 1.5x between
  runs on a busy VM, which made "% of matmul" swing with it)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  ts = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, a))
    ts.append(time.perf_counter() - t0)
  return 2 * n ** 3 / np.min(ts) / 1e9
