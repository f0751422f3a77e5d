"""Bilinear warp (sampling) kernel with a hand-written VJP.

Conventions: an image is (H, W, C); sampling coordinates are (H', W', 2) absolute
positions in pixels, (row, col), with pixel centres at integer positions.

The VJP returns the coordinate cotangent with gathers only. The image cotangent is
a scatter-add (the expensive part); it is built only when ``image_grad=True``.
Use :func:`warp_data` for data images (I_0, m_0) that never need a gradient.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

PADDINGS = ("border", "zeros")


def _corners(coords, h, w, padding):
  """Flat indices and bilinear weights of the 4 neighbours (lists of 4 arrays).

  Also returns the partial derivatives of the weights w.r.t. row and col. The
  corners are kept as separate arrays: on XLA:CPU four gathers (or scatters) of
  (H', W') indices run several times faster than one over a stacked (4, H', W').
  """
  r = coords[..., 0]
  c = coords[..., 1]
  if padding == "border":
    # Clamping the position reproduces edge replication (scipy mode="nearest").
    inside_r = (r >= 0) & (r <= h - 1)
    inside_c = (c >= 0) & (c <= w - 1)
    r = jnp.clip(r, 0, h - 1)
    c = jnp.clip(c, 0, w - 1)
  r0f = jnp.floor(r)
  c0f = jnp.floor(c)
  fr = r - r0f
  fc = c - c0f
  r0 = r0f.astype(jnp.int32)
  c0 = c0f.astype(jnp.int32)
  r1 = r0 + 1
  c1 = c0 + 1
  wr0, wr1 = 1.0 - fr, fr
  wc0, wc1 = 1.0 - fc, fc
  if padding == "border":
    r1 = jnp.minimum(r1, h - 1)
    c1 = jnp.minimum(c1, w - 1)
    vr0 = vr1 = vc0 = vc1 = None
    dr_mask = inside_r.astype(coords.dtype)
    dc_mask = inside_c.astype(coords.dtype)
  else:  # zeros: corners outside the grid contribute 0 (scipy "grid-constant").
    vr0 = ((r0 >= 0) & (r0 <= h - 1)).astype(coords.dtype)
    vr1 = ((r1 >= 0) & (r1 <= h - 1)).astype(coords.dtype)
    vc0 = ((c0 >= 0) & (c0 <= w - 1)).astype(coords.dtype)
    vc1 = ((c1 >= 0) & (c1 <= w - 1)).astype(coords.dtype)
    r0 = jnp.clip(r0, 0, h - 1)
    r1 = jnp.clip(r1, 0, h - 1)
    c0 = jnp.clip(c0, 0, w - 1)
    c1 = jnp.clip(c1, 0, w - 1)
    wr0, wr1, wc0, wc1 = wr0 * vr0, wr1 * vr1, wc0 * vc0, wc1 * vc1
    dr_mask = dc_mask = None
  idx = [r0 * w + c0, r0 * w + c1, r1 * w + c0, r1 * w + c1]
  wts = [wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1]
  # d(weight)/d(row), d(weight)/d(col): rows of the 2x2 bilinear stencil.
  if padding == "border":
    one_r0, one_r1, one_c0, one_c1 = -1.0, 1.0, -1.0, 1.0
  else:
    one_r0, one_r1, one_c0, one_c1 = -vr0, vr1, -vc0, vc1
  dwr = [one_r0 * wc0, one_r0 * wc1, one_r1 * wc0, one_r1 * wc1]
  dwc = [wr0 * one_c0, wr0 * one_c1, wr1 * one_c0, wr1 * one_c1]
  if padding == "border":
    dwr = [d * dr_mask for d in dwr]
    dwc = [d * dc_mask for d in dwc]
  return idx, wts, dwr, dwc


def _channels(img):
  """(H, W, C) -> list of C flat (H*W,) channels (scalar gathers are fastest on CPU)."""
  h, w, ch = img.shape
  return [img[..., k].reshape(h * w) for k in range(ch)]


def _gather(flat, idx):
  # flat: (H*W,), idx: (H', W') int32 -> (H', W')
  return flat.at[idx].get(mode="promise_in_bounds")


def _warp_impl(img, coords, padding):
  h, w, _ = img.shape
  idx, wts, _, _ = _corners(coords, h, w, padding)
  wts = [wt.astype(img.dtype) for wt in wts]
  outs = []
  for flat in _channels(img):
    o = 0.0
    for i, wt in zip(idx, wts):
      o = o + _gather(flat, i) * wt
    outs.append(o)
  return jnp.stack(outs, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _warp(img, coords, padding, image_grad):
  return _warp_impl(img, coords, padding)


def _warp_fwd(img, coords, padding, image_grad):
  return _warp_impl(img, coords, padding), (img, coords)


def _warp_bwd(padding, image_grad, res, g):
  img, coords = res
  h, w, ch = img.shape
  idx, wts, dwr, dwc = _corners(coords, h, w, padding)
  # Coordinate cotangent: gathers only.
  g_r = g_c = 0.0
  for k, flat in enumerate(_channels(img)):
    gk = g[..., k]
    for i, dr, dc in zip(idx, dwr, dwc):
      gv = _gather(flat, i) * gk
      g_r = g_r + gv * dr
      g_c = g_c + gv * dc
  g_coords = jnp.stack([g_r, g_c], axis=-1).astype(coords.dtype)
  if image_grad:
    # Image cotangent: one scatter-add per corner, of (H'*W', C) rows.
    g_flat = jnp.zeros((h * w, ch), img.dtype)
    for i, wt in zip(idx, wts):
      g_flat = g_flat.at[i.reshape(-1)].add(
          (g * wt[..., None].astype(g.dtype)).reshape(-1, ch), mode="promise_in_bounds")
    g_img = g_flat.reshape(h, w, ch)
  else:
    g_img = jnp.zeros_like(img)
  return g_img, g_coords


_warp.defvjp(_warp_fwd, _warp_bwd)


def _check(img, coords, padding):
  if img.ndim != 3:
    raise ValueError(f"warp: img must be (H, W, C), got shape {img.shape}")
  if coords.shape[-1] != 2 or coords.ndim != 3:
    raise ValueError(f"warp: coords must be (H', W', 2), got shape {coords.shape}")
  if padding not in PADDINGS:
    raise ValueError(f"warp: padding must be one of {PADDINGS}, got {padding!r}")


def warp(img: Float[Array, "H W C"], coords: Float[Array, "Hp Wp 2"],
         padding: str = "border", image_grad: bool = True
         ) -> Float[Array, "Hp Wp C"]:
  """Samples `img` bilinearly at `coords`.

  Args:
    img: (H, W, C) field.
    coords: (H', W', 2) absolute (row, col) positions in pixels.
    padding: "border" clamps positions to the grid (scipy ``mode="nearest"``);
      "zeros" treats the outside as 0 (scipy ``mode="grid-constant"``).
    image_grad: build the image cotangent (a scatter-add) in the VJP. With
      False the image is treated as constant data: its cotangent is zero.

  Returns:
    (H', W', C) samples. Works under ``jit`` and ``vmap``.
  """
  img = jnp.asarray(img)
  coords = jnp.asarray(coords)
  _check(img, coords, padding)
  return _warp(img, coords, padding, bool(image_grad))


def warp_data(img: Float[Array, "H W C"], coords: Float[Array, "Hp Wp 2"],
              padding: str = "border") -> Float[Array, "Hp Wp C"]:
  """:func:`warp` for data images (I_0, m_0): only the coordinate gradient is built."""
  return warp(jax.lax.stop_gradient(img), coords, padding, image_grad=False)


def one_hot(labels, num_classes: int, dtype=jnp.float32):
  """(H, W) integer labels -> (H, W, K) one-hot."""
  return jax.nn.one_hot(labels, num_classes, dtype=dtype)


def warp_labels(labels, coords: Float[Array, "Hp Wp 2"], num_classes: int | None = None,
                padding: str = "border") -> Float[Array, "Hp Wp K"]:
  """Soft-warps a label map: bilinear warp of its one-hot (or soft) encoding.

  Args:
    labels: (H, W) integer labels (then `num_classes` is required) or an
      (H, W, K) one-hot / soft map.
    coords: (H', W', 2) absolute (row, col) sampling positions in pixels.

  Returns:
    (H', W', K) soft map (sums to 1 per pixel with border padding). Use it in
    losses; :func:`hard_labels` gives the hard mask.
  """
  labels = jnp.asarray(labels)
  if labels.ndim == 2:
    if num_classes is None:
      raise ValueError("warp_labels: num_classes is required for integer labels")
    labels = one_hot(labels, num_classes)
  return warp_data(labels, coords, padding)


def hard_labels(soft: Float[Array, "H W K"]):
  """Argmax over the class axis: (H, W, K) soft map -> (H, W) int32 labels."""
  return jnp.argmax(soft, axis=-1).astype(jnp.int32)


def identity_grid(h: int, w: int, dtype=jnp.float32) -> Float[Array, "H W 2"]:
  """(H, W, 2) absolute (row, col) positions of the pixel centres."""
  r, c = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype),
                      indexing="ij")
  return jnp.stack([r, c], axis=-1)
