"""Spatial sums on XLA:CPU: jnp.sum against kernels.sum_spatial / sum_to (not in CI).

  python benchmarks/sums.py [--size=128] [--batch=10] [--channels=2,16,32,64] [--repeats=15]

For a (batch, size, size, C) float32 map, median ms of: one elementwise pass
(x * 1.5 + 1, for scale), the sum over (H, W) and over (N, H, W) by jnp.sum and
by the row-first kernels (`kernels.sum_spatial`, `kernels.sum_to`), and the
instance-norm VJP by autodiff of the jnp formula and by `kernels.instance_norm`.
Every function is jitted with the fit's CPU compile options
(`fit.compiler_options`); the calls of a row alternate.
"""
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax import cpu_malloc, fit
from echo_ode_jax.kernels import instance_norm, sum_spatial, sum_to

_SIZE = flags.DEFINE_integer("size", 128, "Image side (pixels).")
_BATCH = flags.DEFINE_integer("batch", 10, "Maps (the knots of one fit).")
_CH = flags.DEFINE_list("channels", ["2", "16", "32", "64"], "Channel counts.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed calls per function (median).")


def _norm_ref(x):
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=(1, 2), keepdims=True) + 1e-5)


def main(argv):
  cpu_malloc.reexec_with_huge_pages()   # as the fitting scripts (ECHO_ODE_MALLOC=default: off)
  del argv
  opts = fit.compiler_options(fit.FitConfig())
  jit = lambda f: jax.jit(f, compiler_options=opts)
  pre = lambda x: x * 1.5 + 1.0       # the sums read a fusion's output, as in the step
  vjp = lambda norm: jit(lambda x, g: jax.vjp(norm, pre(x))[1](g)[0])
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, batch {_BATCH.value}, "
        f"{_SIZE.value}^2, compile options {opts}; ms")
  print("| C | elementwise pass | sum (H, W) jnp | sum (H, W) rows | sum (N, H, W) jnp | "
        "sum (N, H, W) rows | instance-norm VJP jnp | instance-norm VJP kernel |")
  print("|---|---|---|---|---|---|---|---|")
  for c in (int(s) for s in _CH.value):
    shape = (_BATCH.value, _SIZE.value, _SIZE.value, c)
    x = jnp.asarray(np.random.default_rng(c).normal(size=shape), jnp.float32)
    g = jnp.asarray(np.random.default_rng(c + 1).normal(size=shape), jnp.float32)
    fns = [(jit(pre), (x,)),
           (jit(lambda x: jnp.sum(pre(x), axis=(1, 2))), (x,)),
           (jit(lambda x: sum_spatial(pre(x))), (x,)),
           (jit(lambda x: jnp.sum(pre(x), axis=(0, 1, 2))), (x,)),
           (jit(lambda x: sum_to(pre(x), (c,))), (x,)),
           (vjp(_norm_ref), (x, g)),
           (vjp(lambda x_: instance_norm(x_, 1e-5)), (x, g))]
    for f, a in fns:
      jax.block_until_ready(f(*a))
    np.testing.assert_allclose(fns[2][0](x), fns[1][0](x), rtol=1e-4, atol=1e-2)
    times = [[] for _ in fns]
    for _ in range(_REPEATS.value):
      for (f, a), ts in zip(fns, times):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - t0)
    print(f"| {c} | " + " | ".join(f"{1e3 * np.median(ts):.2f}" for ts in times) + " |",
          flush=True)


if __name__ == "__main__":
  app.run(main)
