"""Warp kernel benchmark against jax.scipy.ndimage.map_coordinates (one run).

  python benchmarks/kernels.py [--sizes=256,512] [--channels=2] [--repeats=200]

Times, at each size, the forward pass and the backward pass (coordinate gradient,
with and without the image cotangent) of echo_ode_jax.warp, and the same for
jax.scipy.ndimage.map_coordinates(order=1, mode="nearest") with JAX autodiff,
and prints the ratio. Every row is measured in the same process, the two
implementations' calls alternating (the calls take about a millisecond, so
repeat the run: one run's ratios can be off by tens of percent).
"""
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import echo_ode_jax as eo
from echo_ode_jax import cpu_malloc

_SIZES = flags.DEFINE_list("sizes", ["256", "512"], "Square image sizes.")
_CH = flags.DEFINE_integer("channels", 2, "Channels (2 = a velocity field).")
_REPEATS = flags.DEFINE_integer("repeats", 200, "Timed repeats (median reported).")


def _time_pair(f, g, *args, repeats):
  """Median seconds of f(*args) and of g(*args), the calls alternating."""
  jax.block_until_ready((f(*args), g(*args)))  # compile
  tf, tg = [], []
  for _ in range(repeats):
    for fn, ts in ((f, tf), (g, tg)):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      ts.append(time.perf_counter() - t0)
  return float(np.median(tf)), float(np.median(tg))


def _scipy_warp(img, coords):
  pts = jnp.moveaxis(coords, -1, 0)
  return jnp.stack([jax.scipy.ndimage.map_coordinates(img[..., k], pts, order=1,
                                                      mode="nearest")
                    for k in range(img.shape[-1])], axis=-1)


def main(argv):
  cpu_malloc.reexec_with_huge_pages()   # as the fitting scripts (ECHO_ODE_MALLOC=default: off)
  del argv
  print(f"devices: {jax.devices()}  jax {jax.__version__}")
  print(f"{'size':>5} {'pass':<28} {'echo_ode_jax ms':>16} {'jax.scipy ms':>13} {'ratio':>7}")
  for n in map(int, _SIZES.value):
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.normal(size=(n, n, _CH.value)), jnp.float32)
    coords = eo.identity_grid(n, n) + jnp.asarray(rng.normal(scale=3.0, size=(n, n, 2)),
                                                  jnp.float32)
    cot = jnp.asarray(rng.normal(size=(n, n, _CH.value)), jnp.float32)
    loss = lambda w: (lambda i, c: jnp.sum(w(i, c) * cot))
    ours = {
        "forward": jax.jit(eo.warp),
        "grad coords + image": jax.jit(jax.grad(loss(eo.warp), argnums=(0, 1))),
        "grad coords only (warp_data)": jax.jit(jax.grad(loss(eo.warp_data), argnums=1)),
    }
    ref = {
        "forward": jax.jit(_scipy_warp),
        "grad coords + image": jax.jit(jax.grad(loss(_scipy_warp), argnums=(0, 1))),
        "grad coords only (warp_data)": jax.jit(jax.grad(loss(_scipy_warp), argnums=1)),
    }
    for name in ours:
      a, b = _time_pair(ours[name], ref[name], img, coords, repeats=_REPEATS.value)
      print(f"{n:>5} {name:<28} {1e3 * a:>16.2f} {1e3 * b:>13.2f} {b / a:>6.1f}x")


if __name__ == "__main__":
  app.run(main)
