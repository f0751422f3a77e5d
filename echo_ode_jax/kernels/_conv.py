"""2-D convolution with hand-written VJPs whose weight gradient avoids XLA:CPU's slow path.

XLA:CPU computes a convolution's weight gradient as a convolution with a huge
"kernel" (the whole output map), after transposing both operands: at a fifth
to a third of the matmul rate on the CPUs measured here, 1.4-2.7x the time of
the forward pass (`python benchmarks/conv.py`, in BENCHMARKS.md). Three
rewrites of the same gradient, each exact up to float32 summation order:

  "native"   C++ kernels called as XLA FFI custom calls (:mod:`._native`):
             cache-blocked, register-blocked GEMMs over the taps, in XLA's
             thread pool, for the weight gradient and (with 2 or more output
             channels) the forward pass and the input gradient. Stride-1
             float32 convs; others take XLA's.
  "split"    XLA's own weight gradient, once per group of SPLIT_CHANNELS (16)
             output channels (slices of the output cotangent), concatenated.
  "shifted"  a sum over the kh*kw kernel taps of one GEMM each:
               dW[i, j] = sum_{n, y, x} X_pad[n, s*y + i, s*x + j, :]^T dY[n, y, x, :]
             For stride 1 the taps are contiguous windows of the padded input
             flattened over (images, rows, padded width), with the cotangent
             padded to the same grid.

"split" and "shifted" keep XLA's forward pass and input gradient (a
transposed convolution, as fast as the forward pass). By default (impl=None, :func:`default_impl`) a CPU
conv uses "native" when the kernel builds on this host (a C++ compiler is
needed once), else "split" above SPLIT_CHANNELS output channels and plain XLA
below; on other backends every conv is `lax.conv_general_dilated`, whose
autodiff maps to cuDNN. The choice is made at trace time. The fit programs
resolve it the same way (`fit.model_config`), except that without the native
kernel a multi-core CPU, where they compile with YNNPACK off
(`fit.compiler_options`) and XLA's Eigen weight gradient beats "split", uses "xla".
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

from echo_ode_jax.kernels import _native

_DN = ("NHWC", "HWIO", "NHWC")
SPLIT_CHANNELS = 16   # CPU default: "split" above this many output channels, in groups of it


def _pads(hw, kernel_hw, strides, padding):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(hw, kernel_hw, strides, padding))
  return tuple(tuple(p) for p in padding)


def _conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN,
                                  preferred_element_type=None)


def weight_grad_shifted(x: Float[Array, "N H W Ci"], g: Float[Array, "N Ho Wo Co"],
                        kernel_hw: tuple[int, int], strides: tuple[int, int],
                        pads) -> Float[Array, "kh kw Ci Co"]:
  """dL/dW of a NHWC x HWIO convolution from its output cotangent g, as GEMMs."""
  n, h, w, ci = x.shape
  _, ho, wo, co = g.shape
  kh, kw = kernel_hw
  sh, sw = strides
  (pt, pb), (pl, pr) = pads
  acc = jnp.promote_types(x.dtype, jnp.float32)
  taps = []
  if (sh, sw) == (1, 1):
    # Flatten (image, padded rows, padded width) into one axis M: tap (i, j) is
    # then the contiguous window of M rows starting at i * Wp + j, one plain
    # (M, Ci)^T (M, Co) GEMM. g is zero-padded to the same (rows, Wp) grid, so
    # positions that wrap around a row or image end contribute nothing.
    wp = w + pl + pr
    hp = h + pt + pb + 1
    m = n * hp * wp
    xp = jnp.pad(x, ((0, 0), (pt, pb + 1), (pl, pr), (0, 0))).reshape(m, ci)
    xp = jnp.pad(xp, ((0, (kh - 1) * wp + kw - 1), (0, 0)))
    gp = jnp.pad(g, ((0, 0), (0, hp - ho), (0, wp - wo), (0, 0))).reshape(m, co)
    for i in range(kh):
      for j in range(kw):
        win = lax.slice_in_dim(xp, i * wp + j, i * wp + j + m, axis=0)
        taps.append(lax.dot_general(win, gp, (((0,), (0,)), ((), ())),
                                    preferred_element_type=acc))
  else:
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    g2 = g.reshape(n, ho * wo, co)
    for i in range(kh):
      for j in range(kw):
        win = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, ci),
                        (1, sh, sw, 1)).reshape(n, ho * wo, ci)
        taps.append(lax.dot_general(win, g2, (((0, 1), (0, 1)), ((), ())),
                                    preferred_element_type=acc))
  return jnp.stack(taps).reshape(kh, kw, ci, co)


def weight_grad_split(x: Float[Array, "N H W Ci"], g: Float[Array, "N Ho Wo Co"],
                      kernel_hw: tuple[int, int], strides: tuple[int, int], pads,
                      channels: int = SPLIT_CHANNELS) -> Float[Array, "kh kw Ci Co"]:
  """dL/dW as XLA's weight gradient per group of `channels` output channels."""
  co = g.shape[-1]
  return jnp.concatenate([weight_grad_xla(x, g[..., a:a + channels], kernel_hw, strides, pads)
                          for a in range(0, co, channels)], axis=-1)


def weight_grad_xla(x: Float[Array, "N H W Ci"], g: Float[Array, "N Ho Wo Co"],
                    kernel_hw: tuple[int, int], strides: tuple[int, int],
                    pads) -> Float[Array, "kh kw Ci Co"]:
  """dL/dW as XLA's own weight gradient (the autodiff of lax.conv_general_dilated)."""
  zero = jnp.zeros(tuple(kernel_hw) + (x.shape[-1], g.shape[-1]), x.dtype)
  _, vjp = jax.vjp(lambda k: _conv(x, k, strides, pads), zero)
  return vjp(g)[0]


def weight_grad_native(x: Float[Array, "N H W Ci"], g: Float[Array, "N Ho Wo Co"],
                       kernel_hw: tuple[int, int], strides: tuple[int, int],
                       pads) -> Float[Array, "kh kw Ci Co"]:
  """dL/dW from the native CPU kernel (:mod:`._native`) for a stride-1 float32
  conv with non-negative padding; any other conv (a strided one, bf16) takes
  :func:`weight_grad_xla`, the same gradient."""
  if (_native.supports(x.dtype, kernel_hw, strides) and min(min(p) for p in pads) >= 0
      and g.size > 0):
    return _native.conv_weight_grad(x, g, kernel_hw, pads)
  return weight_grad_xla(x, g, kernel_hw, strides, pads)


_WEIGHT_GRADS = {"shifted": weight_grad_shifted, "split": weight_grad_split,
                 "native": weight_grad_native}
IMPLS = ("native", "split", "shifted", "xla")


def _native_conv_ok(x, kernel, strides, pads) -> bool:
  """Whether the native forward kernel computes this conv: stride 1, float32,
  padding >= 0, at most 64 kernel taps, a non-empty output and at least 2
  output channels (with 1, 15 of 16 vector lanes idle, XLA's conv is faster;
  BENCHMARKS.md)."""
  return (tuple(strides) == (1, 1) and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
          and _native.conv_shape_ok(x.shape, kernel.shape, pads) and kernel.shape[-1] >= 2)


def _forward(x, kernel, strides, pads, impl):
  """The conv itself: native where impl="native" and _native_conv_ok, else XLA's."""
  if impl == "native" and _native_conv_ok(x, kernel, strides, pads):
    return _native.conv(x, kernel, pads)
  return _conv(x, kernel, strides, pads)


def _input_grad(x, kernel, g, strides, pads, impl):
  """dL/dx. For stride 1 it is the conv of g with the kernel rotated by 180
  degrees and its channel axes swapped, padded by (k - 1 - p) on each side;
  impl="native" computes that with the native kernel where every such padding
  is >= 0, else XLA's transposed conv."""
  if impl == "native" and tuple(strides) == (1, 1):
    (kh, kw), ((pt, pb), (pl, pr)) = kernel.shape[:2], pads
    tpads = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
    flipped = jnp.flip(kernel, (0, 1)).swapaxes(2, 3)
    if _native_conv_ok(g, flipped, strides, tpads):
      return _native.conv(g, flipped, tpads)
  _, dx_fn = jax.vjp(lambda x_: _conv(x_, kernel, strides, pads), x)
  return dx_fn(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_custom(x, kernel, strides, pads, impl):
  return _forward(x, kernel, strides, pads, impl)


def _conv_custom_fwd(x, kernel, strides, pads, impl):
  return _forward(x, kernel, strides, pads, impl), (x, kernel)


def _conv_custom_bwd(strides, pads, impl, res, g):
  x, kernel = res
  dx = _input_grad(x, kernel, g, strides, pads, impl)
  dw = _WEIGHT_GRADS[impl](x, g, kernel.shape[:2], strides, pads).astype(kernel.dtype)
  return dx, dw


_conv_custom.defvjp(_conv_custom_fwd, _conv_custom_bwd)


def default_impl(out_channels: int) -> str:
  """The impl conv2d(impl=None) uses on this backend for `out_channels` outputs:
  on CPU "native" when the native kernel is available (else "split" above
  SPLIT_CHANNELS outputs, "xla" below), on other backends "xla"."""
  if jax.default_backend() != "cpu":
    return "xla"
  if _native.available():
    return "native"
  return "split" if out_channels > SPLIT_CHANNELS else "xla"


def conv2d(x: Float[Array, "N H W Ci"], kernel: Float[Array, "kh kw Ci Co"],
           strides: tuple[int, int] = (1, 1), padding="SAME", impl: str | None = None
           ) -> Float[Array, "N Ho Wo Co"]:
  """NHWC x HWIO convolution, flax/TF "SAME" (or explicit) padding.

  impl: "native", "split" or "shifted" (the custom VJPs above), "xla"
  (lax.conv_general_dilated and its autodiff), or None: :func:`default_impl`
  (module docstring).
  """
  strides = tuple(int(s) for s in strides)
  pads = _pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  if impl is None:
    impl = default_impl(kernel.shape[-1])
  if impl == "native" and jax.default_backend() != "cpu":
    raise ValueError(f"conv2d: impl='native' runs on the CPU backend only, not "
                     f"{jax.default_backend()!r}")
  if impl in _WEIGHT_GRADS:
    return _conv_custom(x, kernel, strides, pads, impl)
  if impl == "xla":
    return _conv(x, kernel, strides, pads)
  raise ValueError(f"conv2d: impl must be one of {IMPLS} or None, got {impl!r}")


def upsample2(x: Float[Array, "N h w C"], shape_hw) -> Float[Array, "N H W C"]:
  """x2 nearest upsampling of (N, h, w, C), cropped to shape_hw = (H, W)."""
  x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x[:, :shape_hw[0], :shape_hw[1], :]


def _phase_taps(k):
  """Row (axis 0) taps of a 3-tap kernel seen by the two output phases of a x2
  nearest upsampling: phase 0 reads input rows (i-1, i) with weights
  (k0, k1 + k2), phase 1 reads (i, i+1) with (k0 + k1, k2). Returns the two
  2-tap kernels and their (before, after) paddings."""
  return ((jnp.stack([k[0], k[1] + k[2]]), (1, 0)),
          (jnp.stack([k[0] + k[1], k[2]]), (0, 1)))


def conv2d_up_concat(x: Float[Array, "N h w Cx"], skip: Float[Array, "N H W Cs"],
                     kernel: Float[Array, "3 3 Cx+Cs Co"], impl: str | None = None
                     ) -> Float[Array, "N H W Co"]:
  """3x3 SAME conv of concat([x2 nearest upsampling of x, skip]), the U-Net decoder step.

  Equal to ``conv2d(concat([upsample2(x) cropped to (H, W), skip]), kernel)``
  without materialising the upsampled map or the concatenation: the skip part
  is its own conv, and when (H, W) = (2h, 2w) the upsampled part is four 2x2
  convs at the low resolution, one per output phase (a, b) in {0, 1}^2, whose
  kernels sum the 3x3 taps that read the same low-resolution pixel; their
  outputs are interleaved. That is 4/9 of the multiply-adds. An odd H or W (the
  upsampled map is cropped) takes the materialised path. Exact up to float32
  summation order; every conv is :func:`conv2d` with `impl`.
  """
  hw = skip.shape[1:3]
  if kernel.shape[:2] != (3, 3) or hw != (2 * x.shape[1], 2 * x.shape[2]):
    return conv2d(jnp.concatenate([upsample2(x, hw), skip.astype(x.dtype)], axis=-1),
                  kernel, impl=impl)
  cx = x.shape[-1]
  kx, ks = kernel[:, :, :cx], kernel[:, :, cx:]
  rows = []
  for k_row, pad_row in _phase_taps(kx):                   # output row phase a
    cols = [conv2d(x, jnp.swapaxes(k_rc, 0, 1), padding=(pad_row, pad_col), impl=impl)
            for k_rc, pad_col in _phase_taps(jnp.swapaxes(k_row, 0, 1))]   # phase b
    rows.append(jnp.stack(cols, axis=3))                   # (N, h, w, 2: b, Co)
  n, h, w = x.shape[:3]
  up = jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, kernel.shape[-1])  # (N, h, a, w, b)
  return up + conv2d(skip.astype(x.dtype), ks, impl=impl)
