"""SPADE's normalisation + modulation + activation: the native kernel against
the XLA composition (not in CI).

  python benchmarks/norm_modulate.py [--size=128] [--batch=10] [--channels=16,32] [--repeats=15]

For x (batch, size, size, C), gb (batch, size, size, 2C) and bias (2C),
float32, median ms of `kernels.norm_modulate(x, gb, bias)` forward, and of its
VJP (forward + backward, all three cotangents), traced with XLA's ops only
(ECHO_ODE_NATIVE=off: bias add, channel split, `instance_norm`, `modulate`) and
with the native kernel (ECHO_ODE_NATIVE=on: the fused C++ kernel); plus one
elementwise pass over x (x * 1.5 + 1) for scale. Jitted with the fit's CPU
compile options (`kernels.compiler_options`); the calls of a row alternate.
"""
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax import cpu_malloc, kernels
from echo_ode_jax.kernels import native_available, norm_modulate

_SIZE = flags.DEFINE_integer("size", 128, "Image side (pixels).")
_BATCH = flags.DEFINE_integer("batch", 10, "Maps (the knots of one fit).")
_CH = flags.DEFINE_list("channels", ["16", "32"], "Channel counts C of x.")
_REPEATS = flags.DEFINE_integer("repeats", 15, "Timed calls per function (median).")


def main(argv):
  cpu_malloc.reexec_with_huge_pages()   # as the fitting scripts (ECHO_ODE_MALLOC=default: off)
  del argv
  if not native_available():
    raise SystemExit("norm_modulate.py: the native kernels are unavailable on this host")
  opts = kernels.compiler_options()
  jit = lambda f: jax.jit(f, compiler_options=opts)

  def traced(impl, f, *args):   # the backend's choice is made when f is traced
    with kernels.forced("on" if impl == "native" else "off"):
      return jit(f).lower(*args).compile()
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, batch {_BATCH.value}, "
        f"{_SIZE.value}^2; ms")
  print("| C | elementwise pass | forward XLA | forward native | XLA / native | "
        "VJP XLA | VJP native | XLA / native |")
  print("|---|---|---|---|---|---|---|---|")
  for c in (int(s) for s in _CH.value):
    rng = np.random.default_rng(c)
    shape = (_BATCH.value, _SIZE.value, _SIZE.value, c)
    x = jnp.asarray(rng.normal(1.0, 2.0, size=shape), jnp.float32)
    gb = jnp.asarray(rng.normal(0, 0.5, size=shape[:3] + (2 * c,)), jnp.float32)
    bias = jnp.asarray(rng.normal(0, 0.3, size=(2 * c,)), jnp.float32)
    d = jnp.asarray(rng.normal(size=shape), jnp.float32)
    fwd = lambda impl: traced(impl, norm_modulate, x, gb, bias)
    vjp = lambda impl: traced(impl, lambda x, gb, b, d: jax.vjp(norm_modulate, x, gb, b)[1](d),
                              x, gb, bias, d)
    fns = [(jit(lambda x: x * 1.5 + 1.0), (x,)), (fwd("xla"), (x, gb, bias)),
           (fwd("native"), (x, gb, bias)), (vjp("xla"), (x, gb, bias, d)),
           (vjp("native"), (x, gb, bias, d))]
    for f, a in fns:
      jax.block_until_ready(f(*a))
    np.testing.assert_allclose(fns[2][0](x, gb, bias), fns[1][0](x, gb, bias), rtol=1e-4,
                               atol=1e-4)
    times = [[] for _ in fns]
    for _ in range(_REPEATS.value):
      for k, (f, a) in enumerate(fns):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        times[k].append(1e3 * (time.perf_counter() - t0))
    m = [float(np.median(t)) for t in times]
    print(f"| {c} | {m[0]:.2f} | {m[1]:.2f} | {m[2]:.2f} | {m[1] / m[2]:.2f} | {m[3]:.2f} | "
          f"{m[4]:.2f} | {m[3] / m[4]:.2f} |")


if __name__ == "__main__":
  app.run(main)
