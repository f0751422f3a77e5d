"""A 3x3 conv on CPU: XLA's ops against the native kernels, per pass.

  python benchmarks/conv.py [--size=128] [--batch=10] [--repeats=7] \
      [--channels=16:16,16:2,32:16,16:32,24:24,32:32,33:32,48:32,64:32,16:64] [--noynn]

For each Ci:Co pair, a 3x3 stride-1 SAME convolution of a (batch, size, size,
Ci) float32 input: the forward pass, the input gradient and the weight
gradient of `kernels.conv2d`, traced with XLA's ops only (ECHO_ODE_NATIVE=off)
and, when the native kernels build on this host, with them
(ECHO_ODE_NATIVE=on); timed alternately in one run (median, ms), with XLA's
time over the native one per pass (above 1: native faster; the fit programs
choose per shape by measuring the same, `kernels.cpu.autotune`). --noynn
compiles every program with XLA:CPU's YNNPACK fusions off (as
`kernels.compiler_options` does with more than one core). GFLOP/s counts
2 * batch * size^2 * 9 * Ci * Co per pass. Like the fitting scripts, it first
restarts with glibc's huge-page malloc tunable (`echo_ode_jax.cpu_malloc`;
ECHO_ODE_MALLOC=default skips it).
"""
import functools
import time

from absl import app, flags
import jax
import numpy as np

from echo_ode_jax import cpu_malloc, kernels
from echo_ode_jax.kernels import conv2d, native_available
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
  opts = None if _YNN.value else {"xla_cpu_experimental_ynn_fusion_type": ""}
  paths = ["xla"] + (["native"] if native_available() else [])
  kinds = ("fwd", "dx", "dw")
  heads = {"fwd": "forward", "dx": "input grad", "dw": "weight grad"}
  passes = [(k, p) for k in kinds for p in paths]
  print("| Ci→Co | " + " | ".join(f"{heads[k]} {p} ms" for k, p in passes)
        + "".join(f" | XLA/native {heads[k]}" for k in kinds if "native" in paths) + " | "
        + " | ".join(f"GFLOP/s {heads[k]} {p}" for k, p in passes) + " |")
  print("|---" * (1 + 2 * len(passes) + (len(kinds) if "native" in paths else 0)) + "|")

  def program(kind, path, x, w, g):
    if kind == "fwd":
      fn = lambda x, w, g: conv2d(x, w)
    elif kind == "dx":
      fn = lambda x, w, g: jax.vjp(lambda a: conv2d(a, w), x)[1](g)[0]
    else:
      fn = lambda x, w, g: jax.vjp(lambda b: conv2d(x, b), w)[1](g)[0]
    with kernels.forced("on" if path == "native" else "off"):   # chosen when traced
      return jax.jit(fn, compiler_options=opts).lower(x, w, g).compile()

  for pair in _CH.value:
    ci, co = map(int, pair.split(":"))
    k = jax.random.PRNGKey(ci * 100 + co)
    x = jax.random.normal(k, (_BATCH.value, _SIZE.value, _SIZE.value, ci))
    w = jax.random.normal(k, (3, 3, ci, co)) * 0.1
    g = jax.random.normal(k, (_BATCH.value, _SIZE.value, _SIZE.value, co))
    fns = {p: program(*p, x, w, g) for p in passes}
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
             + [f"{m[k, 'xla'] / m[k, 'native']:.2f}" for k in kinds if "native" in paths]
             + [f"{gflop / m[p] * 1e3:.0f}" for p in passes])
    print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  app.run(main)
