"""CPU speed levers that were measured and rejected (not in CI, not in the library).

  python benchmarks/cpu_levers.py winograd [--size=128] [--batch=10] [--repeats=7] \
      [--channels=32:32,16:32,16:16]
  python benchmarks/cpu_levers.py knot_chunks [--size=128] [--repeats=5] [--chunks=10,5,2,1]
  python benchmarks/cpu_levers.py wgrad [--size=128] [--batch=10] [--repeats=9] \
      [--wgrad_channels=16:16,32:16,16:32,32:32,48:32,64:32,16:64]

winograd: a 3x3 stride-1 SAME convolution as Winograd F(2x2, 3x3) and F(4x4,
3x3) written in JAX (strided-slice input transform, one batched GEMM per tile
point, output transform, VJP by autodiff), against `kernels.conv2d` with its
default impl: forward and VJP (input + weight gradient) medians in ms, timed
alternately, and the relative error against `lax.conv_general_dilated`.

knot_chunks: the loss gradient of the fit step with the velocity network called
on chunks of c knots (concatenated) instead of all knots at once; the same
function. Rows alternate (median ms; the first row is the default, all knots).

wgrad: a 3x3 stride-1 SAME conv's weight gradient, XLA's own (what the fit
programs use on a multi-core CPU) against GEMM rewrites, every program
compiled as the fit's (`fit.compiler_options`, YNNPACK off with more than one
core): "im2col" (the 9 taps' windows concatenated on the channel axis, one
(M, 9 Ci)^T (M, Co) GEMM, M = batch * size^2), "im2col CM" (the same from
the channel-major (Ci, N, H, W) transpose, one (9 Ci, M) (M, Co) GEMM, the
GEMM shape XLA:CPU runs fastest), "taps CM" (one such GEMM per tap),
"taps" (one (M, Ci)^T (M, Co) contraction per tap's window) and "halves" (XLA's
weight gradient of each half of the batch, summed). Medians in ms, the calls
alternating; each rewrite is checked against XLA's (relative error < 1e-4).
"""
import functools
import time

from absl import app, flags
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from echo_ode_jax import cpu_malloc, fit, losses
from echo_ode_jax import model as model_lib
from echo_ode_jax.kernels import conv2d

from _case import profile_case  # benchmarks/_case.py (this script's folder)

_SIZE = flags.DEFINE_integer("size", 128, "Image side (pixels).")
_BATCH = flags.DEFINE_integer("batch", 10, "winograd: batch (the knots of one fit).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per row (median).")
_CH = flags.DEFINE_list("channels", ["32:32", "16:32", "16:16"], "winograd: Ci:Co pairs.")
_CHUNKS = flags.DEFINE_list("chunks", ["10", "5", "2", "1"], "knot_chunks: knots per call.")
_WG_CH = flags.DEFINE_list("wgrad_channels", ["16:16", "32:16", "16:32", "32:32", "48:32",
                                              "64:32", "16:64"], "wgrad: Ci:Co pairs.")

# Winograd matrices B^T, G, A^T (Lavin & Gray 2016): F(2,3) on points {0, 1, -1},
# F(4,3) on {0, 1, -1, 2, -2}.
_F = {
    2: ([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
        [[1, 0, 0], [.5, .5, .5], [.5, -.5, .5], [0, 0, 1]],
        [[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: ([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
         [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
        [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
         [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
        [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}


def _lin(coefs, xs):
  """sum_i coefs[i] * xs[i], skipping zero coefficients."""
  terms = [x if c == 1 else -x if c == -1 else c * x for c, x in zip(coefs, xs) if c != 0]
  return functools.reduce(lambda a, b: a + b, terms)


def winograd_conv(x, w, m: int = 2):
  """3x3 stride-1 SAME conv of x (N, H, W, Ci) with w (3, 3, Ci, Co) as Winograd F(m, 3)."""
  bt, g, at = (np.asarray(a, np.float64) for a in _F[m])
  a = m + 2
  n, h, wd, ci = x.shape
  co = w.shape[-1]
  th, tw = -(-h // m), -(-wd // m)
  xp = jnp.pad(x, ((0, 0), (1, th * m + 1 - h), (1, tw * m + 1 - wd), (0, 0)))
  rows = [xp[:, r:r + m * (th - 1) + 1:m] for r in range(a)]            # (n, th, Wp, ci)
  ur = [_lin(bt[k], rows) for k in range(a)]
  v = []
  for k1 in range(a):
    cols = [ur[k1][:, :, s:s + m * (tw - 1) + 1:m] for s in range(a)]    # (n, th, tw, ci)
    v += [_lin(bt[k2], cols) for k2 in range(a)]
  v = jnp.stack(v).reshape(a * a, n * th * tw, ci)
  gm = jnp.asarray(g, w.dtype)
  u = jnp.einsum("ki,ijcd,lj->klcd", gm, w, gm).reshape(a * a, ci, co)
  mm = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,)))).reshape(a, a, n, th, tw, co)
  yr = [_lin(at[p], [mm[k] for k in range(a)]) for p in range(m)]        # (a, n, th, tw, co)
  y = jnp.stack([jnp.stack([_lin(at[q], [yr[p][k] for k in range(a)]) for q in range(m)], 3)
                 for p in range(m)], 2)                                  # (n, th, p, tw, q, co)
  return y.reshape(n, th * m, tw * m, co)[:, :h, :wd]


def _time(fns, args, repeats):
  for f, a in zip(fns, args):
    jax.block_until_ready(f(*a))
  ts = [[] for _ in fns]
  for _ in range(repeats):
    for f, a, t in zip(fns, args, ts):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      t.append(1e3 * (time.perf_counter() - t0))
  return [float(np.median(t)) for t in ts]


def _winograd():
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, batch {_BATCH.value}, "
        f"{_SIZE.value}^2")
  print("| Ci→Co | conv2d fwd | conv2d VJP | F(2,3) fwd | F(2,3) VJP | F(4,3) fwd "
        "| F(4,3) VJP | F(2,3) rel err | F(4,3) rel err |")
  print("|---|---|---|---|---|---|---|---|---|")
  impls = [conv2d, functools.partial(winograd_conv, m=2), functools.partial(winograd_conv, m=4)]
  for pair in _CH.value:
    ci, co = map(int, pair.split(":"))
    k = jax.random.PRNGKey(ci * 100 + co)
    x = jax.random.normal(k, (_BATCH.value, _SIZE.value, _SIZE.value, ci))
    w = jax.random.normal(jax.random.fold_in(k, 1), (3, 3, ci, co)) / np.sqrt(9 * ci)
    gy = jax.random.normal(jax.random.fold_in(k, 2), (_BATCH.value, _SIZE.value, _SIZE.value, co))
    ref = lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
    errs = [float(jnp.max(jnp.abs(f(x, w) - ref)) / jnp.max(jnp.abs(ref))) for f in impls[1:]]
    fns, args = [], []
    for f in impls:
      fns += [jax.jit(f), jax.jit(lambda x, w, gy, f=f: jax.vjp(f, x, w)[1](gy))]
      args += [(x, w), (x, w, gy)]
    t = _time(fns, args, _REPEATS.value)
    print(f"| {ci}→{co} | " + " | ".join(f"{v:.1f}" for v in t)
          + f" | {errs[0]:.1e} | {errs[1]:.1e} |")


def _knot_chunks():
  cfg = fit.FitConfig()
  size = _SIZE.value
  seq, params = profile_case(cfg, size, 20)     # as fit_speed.py
  apply = model_lib.VelocityUNet(fit.model_config(cfg)).apply

  def chunked(c):
    def apply_c(variables, imgs, m0, t, i0):
      return jnp.concatenate([apply(variables, imgs[a:a + c], m0, t[a:a + c], i0)
                              for a in range(0, t.shape[0], c)], axis=0)
    return apply_c

  chunks = [int(c) for c in _CHUNKS.value]
  fns = [jax.jit(jax.grad(lambda p, c=c: losses.total_loss(
      losses.loss_terms(p, seq, cfg, chunked(c))[0], cfg)),
      compiler_options=fit.compiler_options(cfg)) for c in chunks]
  g0 = jax.tree_util.tree_leaves(fns[0](params))
  scale = max(float(jnp.max(jnp.abs(b))) for b in g0)
  for f in fns[1:]:   # the same function: the gradients agree
    for a, b in zip(jax.tree_util.tree_leaves(f(params)), g0):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale)
  t = _time(fns, [(params,)] * len(fns), _REPEATS.value)
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {size}^2, T=20, "
        f"{jax.tree_util.tree_leaves(seq['image_knots'])[0].shape[0]} knots")
  print("| knots per network call | loss gradient ms | / first row |")
  print("|---|---|---|")
  for c, v in zip(chunks, t):
    print(f"| {c} | {v:.0f} | {v / t[0]:.3f} |")


def _windows(xp, h, w):
  """The 9 tap windows (i, j) of a (..., H + 2, W + 2) map padded by one: (..., H, W) each."""
  return [xp[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]


def _windows_nhwc(xp, h, w):
  """The same windows of an (N, H + 2, W + 2, C) map."""
  return [xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)]


def wgrad_rewrites():
  """{name: f(x (N, H, W, Ci), g (N, H, W, Co)) -> dW (3, 3, Ci, Co)} of a SAME 3x3 conv."""
  pads = ((1, 1), (1, 1))

  def xla(x, g):
    zero = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype)
    return jax.vjp(lambda k: lax.conv_general_dilated(
        x, k, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")), zero)[1](g)[0]

  def im2col(x, g):
    n, h, w, ci = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    p = jnp.concatenate(_windows_nhwc(xp, h, w), axis=-1)                   # N, H, W, 9 Ci
    return lax.dot_general(p.reshape(-1, 9 * ci), g.reshape(-1, g.shape[-1]),
                           (((0,), (0,)), ((), ()))).reshape(3, 3, ci, -1)

  def channel_major(x):
    return jnp.pad(jnp.transpose(x, (3, 0, 1, 2)), ((0, 0), (0, 0), (1, 1), (1, 1)))

  def im2col_cm(x, g):
    n, h, w, ci = x.shape
    p = jnp.stack(_windows(channel_major(x), h, w))                  # 9, Ci, N, H, W
    return (p.reshape(9 * ci, -1) @ g.reshape(-1, g.shape[-1])).reshape(3, 3, ci, -1)

  def taps_cm(x, g):
    n, h, w, ci = x.shape
    gf = g.reshape(-1, g.shape[-1])
    return jnp.stack([a.reshape(ci, -1) @ gf for a in _windows(channel_major(x), h, w)]
                     ).reshape(3, 3, ci, -1)

  def taps(x, g):
    n, h, w, ci = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return jnp.stack([jnp.einsum("nhwc,nhwd->cd", a, g) for a in _windows_nhwc(xp, h, w)]
                     ).reshape(3, 3, ci, -1)

  def halves(x, g):
    b = x.shape[0] // 2
    return xla(x[:b], g[:b]) + xla(x[b:], g[b:])

  return {"XLA": xla, "im2col": im2col, "im2col CM": im2col_cm, "taps CM": taps_cm,
          "taps": taps, "halves": halves}


def _wgrad():
  cfg = fit.FitConfig()
  jit = functools.partial(jax.jit, compiler_options=fit.compiler_options(cfg))
  rewrites = wgrad_rewrites()
  n, size = _BATCH.value, _SIZE.value
  print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, batch {n}, {size}^2, "
        f"compile options {fit.compiler_options(cfg)}")
  print("| Ci→Co | " + " | ".join(f"{k} ms" for k in rewrites) + " | best rewrite / XLA |")
  print("|---|" + "---|" * (len(rewrites) + 1))
  for pair in _WG_CH.value:
    ci, co = map(int, pair.split(":"))
    k = jax.random.PRNGKey(ci * 100 + co)
    x = jax.random.normal(k, (n, size, size, ci))
    g = jax.random.normal(jax.random.fold_in(k, 1), (n, size, size, co))
    fns = [jit(f) for f in rewrites.values()]
    ref = np.asarray(fns[0](x, g))
    for name, f in zip(rewrites, fns[1:]):
      err = float(np.max(np.abs(np.asarray(f(x, g)) - ref)) / np.max(np.abs(ref)))
      assert err < 1e-4, (name, pair, err)
    t = _time(fns, [(x, g)] * len(fns), _REPEATS.value)
    print(f"| {ci}→{co} | " + " | ".join(f"{v:.1f}" for v in t)
          + f" | {min(t[1:]) / t[0]:.2f} |", flush=True)


def main(argv):
  cpu_malloc.reexec_with_huge_pages()   # as the fitting scripts (ECHO_ODE_MALLOC=default: off)
  levers = {"winograd": _winograd, "knot_chunks": _knot_chunks, "wgrad": _wgrad}
  if len(argv) != 2 or argv[1] not in levers:
    raise app.UsageError(f"usage: cpu_levers.py {'|'.join(levers)} [flags]")
  levers[argv[1]]()


if __name__ == "__main__":
  app.run(main)
