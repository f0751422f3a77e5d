"""Shared by the benchmark scripts: the loss-gradient test case (step_profile.py,
cpu_levers.py), the reference matmul rate (fit_speed.py, conv.py) and the
config whose programs XLA's cost analysis counts fully (fit_speed.py, step_profile.py)."""
import time

import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax import fit
from echo_ode_jax import model as model_lib
from echo_ode_jax.data import synthetic


def profile_case(cfg: fit.FitConfig, size: int, frames: int):
  """(prepared sequence as device arrays, params) on the synthetic sequence of
  fit_speed.py: the initial parameters plus N(0, 0.05) noise, so the
  zero-initialised layers carry gradient."""
  s, _ = synthetic.make_sequence(0, size=size, num_frames=frames)
  seq = jax.tree_util.tree_map(jnp.asarray,
                               fit.prepare_sequence(s.img, s.gt[0], s.gt[-1], cfg=cfg))
  params = model_lib.init_params(cfg.model, jax.random.PRNGKey(0), (size, size))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return seq, params


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


def flop_config(cfg: fit.FitConfig) -> fit.FitConfig:
  """cfg for counting FLOPs with XLA's cost analysis: the native conv weight
  gradient is a custom call XLA does not count, so where the fit programs
  resolve conv_impl to "native", the same programs with XLA's conv VJP (the
  same arithmetic)."""
  if fit.model_config(cfg).conv_impl == "native":
    return cfg.replace(**{"model.conv_impl": "xla"})
  return cfg
