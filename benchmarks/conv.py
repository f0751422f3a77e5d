"""Conv weight gradient on CPU: XLA's autodiff vs the "native", "split" and "shifted" VJPs of kernels.conv2d.

  python benchmarks/conv.py [--size=128] [--batch=10] [--repeats=7] \
      [--channels=16:16,16:2,32:16,16:32,24:24,32:32,33:32,48:32,64:32,16:64] [--noynn]

For each Ci:Co pair, a 3x3 stride-1 SAME convolution of a (batch, size, size,
Ci) input: the forward pass, the input gradient and the weight gradient
(XLA); when the native kernel builds on this host, its forward pass and input
gradient (conv2d(impl="native")); and the weight gradients of
conv2d(impl="native"), conv2d(impl="split") and conv2d(impl="shifted"),
timed alternately in one run (median, ms), with the ratios to XLA's and the impl
that conv2d(impl=None) picks. --noynn compiles every program with XLA:CPU's
YNNPACK fusions off (as `fit.compiler_options` does with more than one core),
so the convolutions take XLA's Eigen path. GFLOP/s counts 2 * batch * size^2 *
9 * Ci * Co per pass. Like the fitting scripts, it first restarts with glibc's
huge-page malloc tunable (`echo_ode_jax.cpu_malloc`; ECHO_ODE_MALLOC=default
skips it): without it every call's fresh output buffer is faulted in 4 KiB at a
time, inside the timing.
"""
import functools
import time

from absl import app, flags
import jax
import numpy as np

from echo_ode_jax import cpu_malloc, fit
from echo_ode_jax.kernels import conv2d, default_impl, native_available
from _case import matmul_gflops  # benchmarks/_case.py (this script's folder)

_SIZE = flags.DEFINE_integer("size", 128, "Image side (pixels).")
_BATCH = flags.DEFINE_integer("batch", 10, "Batch (the knots of one fit).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repeats (median).")
_YNN = flags.DEFINE_bool("ynn", True, "XLA:CPU's YNNPACK fusions (XLA's default: on).")
_CH = flags.DEFINE_list("channels", ["16:16", "16:2", "32:16", "16:32", "24:24", "32:32",
                                     "33:32", "48:32", "64:32", "16:64"], "Ci:Co pairs.")


def main(_):
  cpu_malloc.reexec_with_huge_pages()   # as the fitting scripts (ECHO_ODE_MALLOC=default: off)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, batch {_BATCH.value}, "
        f"{_SIZE.value}^2, YNNPACK fusions {'on' if _YNN.value else 'off'}; "
        f"2048^2 float32 matmul {matmul_gflops():.0f} GFLOP/s")
  jit = functools.partial(jax.jit, compiler_options=None if _YNN.value else
                          fit.compiler_options(fit.FitConfig(xla_cpu_ynn=False)))
  impls = (["native"] if native_available() else []) + ["split", "shifted"]
  native = "native" in impls
  # Passes timed, as (kind, impl): XLA's forward, input gradient and weight
  # gradient, the native kernel's forward and input gradient, and every custom
  # weight gradient.
  passes = [("fwd", "xla"), ("dx", "xla"), ("dw", "xla")]
  passes += [("fwd", "native"), ("dx", "native")] if native else []
  passes += [("dw", i) for i in impls]
  heads = {"fwd": "forward", "dx": "input grad", "dw": "weight grad"}
  rates = [p for p in passes if p[1] in ("xla", "native")]
  print("| Ci→Co | " + " | ".join(f"{heads[k]} {i} ms" for k, i in passes)
        + " | " + " | ".join(f"XLA/{i} weight grad" for i in impls) + " | auto picks | "
        + " | ".join(f"GFLOP/s {heads[k]} {i}" for k, i in rates) + " |")
  print("|---" * (2 + len(passes) + len(impls) + len(rates)) + "|")

  def program(kind, impl):
    if kind == "fwd":
      return jit(lambda x, w, g: conv2d(x, w, impl=impl))
    if kind == "dx":
      return jit(lambda x, w, g: jax.vjp(lambda a: conv2d(a, w, impl=impl), x)[1](g)[0])
    return jit(lambda x, w, g: jax.vjp(lambda b: conv2d(x, b, impl=impl), w)[1](g)[0])

  for pair in _CH.value:
    ci, co = map(int, pair.split(":"))
    k = jax.random.PRNGKey(ci * 100 + co)
    x = jax.random.normal(k, (_BATCH.value, _SIZE.value, _SIZE.value, ci))
    w = jax.random.normal(k, (3, 3, ci, co)) * 0.1
    g = jax.random.normal(k, (_BATCH.value, _SIZE.value, _SIZE.value, co))
    fns = {p: program(*p) for p in passes}
    for f in fns.values():
      jax.block_until_ready(f(x, w, g))
    ts = {p: [] for p in fns}
    for _ in range(_REPEATS.value):     # the passes alternate
      for p, f in fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(f(x, w, g))
        ts[p].append(1e3 * (time.perf_counter() - t0))
    m = {p: float(np.median(v)) for p, v in ts.items()}
    gflop = 2 * _BATCH.value * _SIZE.value ** 2 * 9 * ci * co / 1e9
    cells = ([f"{ci}→{co}"] + [f"{m[p]:.1f}" for p in passes]
             + [f"{m['dw', 'xla'] / m['dw', i]:.2f}" for i in impls]
             + [default_impl(co)] + [f"{gflop / m[p] * 1e3:.0f}" for p in rates])
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
