"""2-D convolution (NHWC x HWIO) and the U-Net decoder's upsample + concat + conv.

On XLA:CPU with the native kernels built (:mod:`.cpu.native`), a stride-1
float32 conv has a hand-written VJP whose three parts (the forward pass, the
input gradient, the weight gradient) each run as the native kernel or as XLA's
op, as :func:`._backend.use_native` decides per shape at trace time; XLA:CPU
computes the weight gradient as a convolution whose "kernel" is the whole
output map, far below its matmul rate on the CPUs measured (BENCHMARKS.md,
"Conv kernels"). Everywhere else a conv is ``lax.conv_general_dilated`` and its
autodiff (cuDNN on GPU). Both paths compute the same values and gradients up
to float32 summation order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Float

from echo_ode_jax.kernels import _backend
from echo_ode_jax.kernels.cpu import native
from echo_ode_jax.kernels.cpu.autotune import NATIVE, XLA

_DN = ("NHWC", "HWIO", "NHWC")


def _pads(hw, kernel_hw, strides, padding):
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(hw, kernel_hw, strides, padding))
  return tuple((int(a), int(b)) for a, b in padding)


def _conv(x, kernel, strides, pads):
  return lax.conv_general_dilated(x, kernel, strides, pads, dimension_numbers=_DN,
                                  preferred_element_type=None)


def weight_grad_xla(x: Float[Array, "N H W Ci"], g: Float[Array, "N Ho Wo Co"],
                    kernel_hw: tuple[int, int], strides: tuple[int, int],
                    pads) -> Float[Array, "kh kw Ci Co"]:
  """dL/dW as XLA's own weight gradient (the autodiff of lax.conv_general_dilated)."""
  zero = jnp.zeros(tuple(kernel_hw) + (x.shape[-1], g.shape[-1]), x.dtype)
  _, vjp = jax.vjp(lambda k: _conv(x, k, strides, pads), zero)
  return vjp(g)[0]


def _key(*shapes, pads) -> str:
  """The measured choice's key: operand shapes and the total padding per axis
  (the four phase convs of conv2d_up_concat, padded on one side or the other,
  cost the same)."""
  total = tuple(int(a) + int(b) for a, b in pads)
  return " ".join(str(tuple(int(v) for v in p)) for p in shapes + (total,))


def _random(*shapes):
  rng = np.random.default_rng(0)
  return [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]


def _blocking(fn, *args):
  return lambda: jax.block_until_ready(fn(*args))


def _use_native_conv(x_shape, kernel_shape, pads) -> bool:
  """Whether the stride-1 float32 conv of these shapes runs natively: the
  kernel supports it (padding >= 0, at most native.MAX_TAPS taps, a non-empty
  output, 2 or more output channels) and :func:`_backend.use_native` says so."""
  if not (native.conv_shape_ok(x_shape, kernel_shape, pads) and kernel_shape[-1] >= 2):
    return False

  def runs():
    x, k = _random(x_shape, kernel_shape)
    return {NATIVE: _blocking(_backend.jit(lambda a, b: native.conv(a, b, pads)), x, k),
            XLA: _blocking(_backend.jit(lambda a, b: _conv(a, b, (1, 1), pads)), x, k)}

  return _backend.use_native("conv", _key(x_shape, kernel_shape, pads=pads), runs)


def _use_native_wgrad(x_shape, g_shape, kernel_hw, pads) -> bool:
  """Whether the weight gradient of a stride-1 float32 conv runs natively."""
  if min(min(p) for p in pads) < 0 or 0 in g_shape:
    return False

  def runs():
    x, g = _random(x_shape, g_shape)
    nat = lambda a, b: native.conv_weight_grad(a, b, kernel_hw, pads)
    xla = lambda a, b: weight_grad_xla(a, b, kernel_hw, (1, 1), pads)
    return {NATIVE: _blocking(_backend.jit(nat), x, g),
            XLA: _blocking(_backend.jit(xla), x, g)}

  return _backend.use_native("conv_wgrad", _key(x_shape, g_shape, kernel_hw, pads=pads), runs)


def _forward(x, kernel, pads):
  if _use_native_conv(x.shape, kernel.shape, pads):
    return native.conv(x, kernel, pads)
  return _conv(x, kernel, (1, 1), pads)


def _input_grad(x, kernel, g, pads):
  """dL/dx: the conv of g with the kernel rotated by 180 degrees and its channel
  axes swapped, padded by (k - 1 - p) on each side; natively where that conv
  runs natively, else XLA's transposed conv."""
  (kh, kw), ((pt, pb), (pl, pr)) = kernel.shape[:2], pads
  tpads = ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr))
  flipped_shape = (kh, kw, kernel.shape[3], kernel.shape[2])
  if _use_native_conv(g.shape, flipped_shape, tpads):
    return native.conv(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3), tpads)
  _, dx_fn = jax.vjp(lambda x_: _conv(x_, kernel, (1, 1), pads), x)
  return dx_fn(g)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_cpu(x, kernel, pads):
  return _forward(x, kernel, pads)


def _conv_cpu_fwd(x, kernel, pads):
  return _forward(x, kernel, pads), (x, kernel)


def _conv_cpu_bwd(pads, res, g):
  x, kernel = res
  dx = _input_grad(x, kernel, g, pads)
  if _use_native_wgrad(x.shape, g.shape, kernel.shape[:2], pads):
    dw = native.conv_weight_grad(x, g, kernel.shape[:2], pads)
  else:
    dw = weight_grad_xla(x, g, kernel.shape[:2], (1, 1), pads)
  return dx, dw.astype(kernel.dtype)


_conv_cpu.defvjp(_conv_cpu_fwd, _conv_cpu_bwd)


def conv2d(x: Float[Array, "N H W Ci"], kernel: Float[Array, "kh kw Ci Co"],
           strides: tuple[int, int] = (1, 1), padding="SAME") -> Float[Array, "N Ho Wo Co"]:
  """NHWC x HWIO convolution, flax/TF "SAME" (or explicit ((top, bottom),
  (left, right))) padding; how it runs is the backend's choice (module docstring)."""
  strides = tuple(int(s) for s in strides)
  pads = _pads(x.shape[1:3], kernel.shape[:2], strides, padding)
  if (strides == (1, 1) and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
      and _backend.native_enabled()):
    return _conv_cpu(x, kernel, pads)
  return _conv(x, kernel, strides, pads)


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
                     kernel: Float[Array, "3 3 Cx+Cs Co"]) -> Float[Array, "N H W Co"]:
  """3x3 SAME conv of concat([x2 nearest upsampling of x, skip]), the U-Net decoder step.

  Equal to ``conv2d(concat([upsample2(x) cropped to (H, W), skip]), kernel)``
  without materialising the upsampled map or the concatenation: the skip part
  is its own conv, and when (H, W) = (2h, 2w) the upsampled part is four 2x2
  convs at the low resolution, one per output phase (a, b) in {0, 1}^2, whose
  kernels sum the 3x3 taps that read the same low-resolution pixel; their
  outputs are interleaved. That is 4/9 of the multiply-adds. An odd H or W (the
  upsampled map is cropped) takes the materialised path. Exact up to float32
  summation order; every conv is :func:`conv2d`.
  """
  hw = skip.shape[1:3]
  if kernel.shape[:2] != (3, 3) or hw != (2 * x.shape[1], 2 * x.shape[2]):
    return conv2d(jnp.concatenate([upsample2(x, hw), skip.astype(x.dtype)], axis=-1),
                  kernel)
  cx = x.shape[-1]
  kx, ks = kernel[:, :, :cx], kernel[:, :, cx:]
  rows = []
  for k_row, pad_row in _phase_taps(kx):                   # output row phase a
    cols = [conv2d(x, jnp.swapaxes(k_rc, 0, 1), padding=(pad_row, pad_col))
            for k_rc, pad_col in _phase_taps(jnp.swapaxes(k_row, 0, 1))]   # phase b
    rows.append(jnp.stack(cols, axis=3))                   # (N, h, w, 2: b, Co)
  n, h, w = x.shape[:3]
  up = jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * w, kernel.shape[-1])  # (N, h, a, w, b)
  return up + conv2d(skip.astype(x.dtype), ks)
