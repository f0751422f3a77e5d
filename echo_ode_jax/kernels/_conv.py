"""2-D convolution with a hand-written VJP whose weight gradient is shifted GEMMs.

XLA:CPU computes a convolution's weight gradient as a convolution with a huge
"kernel" (the whole output map), which runs 2-4x slower than the forward pass.
The same gradient is a sum over the kh*kw kernel taps of one GEMM each:

  dW[i, j] = sum_{n, y, x} X_pad[n, s*y + i, s*x + j, :]^T  dY[n, y, x, :]

which is what the "shifted" implementation computes. For stride 1 the taps
are contiguous slices of the padded input flattened over (images, rows, padded
width), with the output cotangent padded to the same grid, so no strided copy
is made. The input gradient is XLA's (a transposed convolution, as fast as the
forward pass).

XLA:CPU's own weight gradient is fast for narrow outputs and slow for wide
ones (at 128^2, batch 10: 2-3x slower than the shifted GEMMs at 24 or more
output channels, ~4x faster at 16 or fewer; `python benchmarks/conv.py`, in
BENCHMARKS.md).
So by default (impl=None) a CPU conv with
at least 24 output channels uses "shifted", every other conv XLA's; on other
backends every conv is plain `lax.conv_general_dilated`, whose autodiff maps
to cuDNN. The choice is made at trace time.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float

_DN = ("NHWC", "HWIO", "NHWC")
SHIFTED_MIN_OUT_CHANNELS = 24   # CPU default: "shifted" from this many output channels


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_shifted(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads)


def _conv_shifted_fwd(x, kernel, strides, pads):
  return _conv(x, kernel, strides, pads), (x, kernel)


def _conv_shifted_bwd(strides, pads, res, g):
  x, kernel = res
  _, dx_fn = jax.vjp(lambda x_: _conv(x_, kernel, strides, pads), x)
  (dx,) = dx_fn(g)
  dw = weight_grad_shifted(x, g, kernel.shape[:2], strides, pads).astype(kernel.dtype)
  return dx, dw


_conv_shifted.defvjp(_conv_shifted_fwd, _conv_shifted_bwd)


def conv2d(x: Float[Array, "N H W Ci"], kernel: Float[Array, "kh kw Ci Co"],
           strides: tuple[int, int] = (1, 1), padding="SAME", impl: str | None = None
           ) -> Float[Array, "N Ho Wo Co"]:
  """NHWC x HWIO convolution, flax/TF "SAME" (or explicit) padding.

  impl: "shifted" (the custom VJP above), "xla" (lax.conv_general_dilated and
  its autodiff), or None: on the CPU backend "shifted" when the kernel has at
  least SHIFTED_MIN_OUT_CHANNELS output channels, else "xla" (module docstring).
  """
  strides = tuple(int(s) for s in strides)
  pads = _pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  if impl is None:
    cpu = jax.default_backend() == "cpu"
    impl = "shifted" if cpu and kernel.shape[-1] >= SHIFTED_MIN_OUT_CHANNELS else "xla"
  if impl == "shifted":
    return _conv_shifted(x, kernel, strides, pads)
  if impl == "xla":
    return _conv(x, kernel, strides, pads)
  raise ValueError(f"conv2d: impl must be 'shifted', 'xla' or None, got {impl!r}")
