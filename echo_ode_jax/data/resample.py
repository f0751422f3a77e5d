"""Resampling between a source grid and the stored square grid (and back).

A source frame (h, w) with pixel spacing (sr, sc) mm is stored on an S x S grid
with ISOTROPIC pixels that keep the physical aspect ratio:

  s = max(h * sr, w * sc) / S             stored spacing, mm per pixel (both axes)
  scale_k = s / source_spacing_k          source pixels per stored pixel
  content_k = round(source_extent_k * source_spacing_k / s)  (<= S)
  pad_k = (S - content_k) // 2            zero padding before the content

Pixel areas are aligned: stored pixel centre j (along axis k) sits at source
coordinate  i = j * scale_k + offset_k,  offset_k = (0.5 - pad_k) * scale_k - 0.5,
so the content rows [pad, pad + content) span the source extent. Hence
``voxelspacing = source_spacing * source_extent / stored_extent`` along the
longer physical axis exactly (stored extent S) and along the other up to the
rounding of `content` to whole pixels.

Images are resampled bilinearly (no anti-aliasing), labels by nearest
neighbour; the padding is 0 (background). :meth:`Resampling.attrs` gives the
view attributes that let :func:`to_source` map a stored mask back to the source
grid exactly (same shape, nearest neighbour).

:func:`resize_nearest` resizes label maps between two grids that cover the same
field of view (pixel areas aligned, no padding): output pixel i takes the
input pixel that contains its centre, floor((i + 0.5) * n_in / n_out)
(:func:`nearest_index`), as ``scipy.ndimage.zoom(order=0, grid_mode=True)``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from scipy import ndimage

from echo_ode_jax.data.hdf5 import UNANNOTATED


@dataclasses.dataclass(frozen=True)
class Resampling:
  """Affine, axis-aligned map between a source grid and the stored S x S grid."""
  source_shape: tuple[int, int]
  source_spacing: tuple[float, float]   # mm per source pixel (row, col)
  size: int                             # S
  spacing: float                        # mm per stored pixel (isotropic)
  scale: tuple[float, float]            # source pixels per stored pixel
  offset: tuple[float, float]           # source coordinate of stored pixel 0
  content: tuple[int, int]              # stored pixels covered by the source
  pad: tuple[int, int]                  # first stored pixel of the content

  @classmethod
  def fit(cls, source_shape, source_spacing, size: int) -> "Resampling":
    """The resampling of a (h, w) grid with spacing (sr, sc) mm onto S x S."""
    h, w = (int(v) for v in source_shape)
    sp = tuple(float(v) for v in source_spacing)
    if h < 1 or w < 1 or size < 1 or min(sp) <= 0 or not np.all(np.isfinite(sp)):
      raise ValueError(f"bad resampling: shape {source_shape}, spacing {source_spacing}")
    spacing = max(h * sp[0], w * sp[1]) / size
    scale = (spacing / sp[0], spacing / sp[1])
    content = tuple(min(size, max(1, int(np.floor(n / sc + 0.5)))) for n, sc in zip((h, w), scale))
    pad = tuple((size - c) // 2 for c in content)
    offset = tuple((0.5 - p) * sc - 0.5 for p, sc in zip(pad, scale))
    return cls((h, w), sp, int(size), spacing, scale, offset, content, pad)

  @classmethod
  def identity(cls, shape, spacing=(1.0, 1.0)) -> "Resampling":
    """Data already on its stored grid (e.g. synthetic): scale 1, no padding."""
    h, w = (int(v) for v in shape)
    return cls((h, w), tuple(float(v) for v in spacing), max(h, w), float(spacing[0]),
               (1.0, 1.0), (0.0, 0.0), (h, w), (0, 0))

  def attrs(self) -> dict[str, np.ndarray]:
    """The view attributes :meth:`from_attrs` reads back (source_shape included)."""
    return {
        "source_shape": np.array(self.source_shape, np.int64),
        "resample_scale": np.array(self.scale, np.float64),
        "resample_offset": np.array(self.offset, np.float64),
        "content_shape": np.array(self.content, np.int64),
        "pad": np.array(self.pad, np.int64),
        "stored_shape": np.array([self.size, self.size], np.int64),
    }

  @classmethod
  def from_attrs(cls, attrs: Mapping[str, Any]) -> "Resampling":
    """Rebuilds the resampling from view attributes (a dict of an HDF5 group)."""
    missing = [k for k in ("source_shape", "resample_scale", "resample_offset",
                           "content_shape", "pad") if k not in attrs]
    if missing:
      raise KeyError(f"resampling attrs missing: {missing}")
    sh = tuple(int(v) for v in np.asarray(attrs["source_shape"]))
    scale = tuple(float(v) for v in np.asarray(attrs["resample_scale"]))
    vs = np.asarray(attrs.get("voxelspacing", (1.0, 1.0)), np.float64)
    src_vs = np.asarray(attrs.get("source_voxelspacing", vs / np.asarray(scale)), np.float64)
    content = tuple(int(v) for v in np.asarray(attrs["content_shape"]))
    pad = tuple(int(v) for v in np.asarray(attrs["pad"]))
    size = int(np.asarray(attrs.get("stored_shape", [max(c + 2 * p for c, p in zip(content, pad))]))[0])
    return cls(sh, tuple(float(v) for v in src_vs), size, float(vs[0]), scale,
               tuple(float(v) for v in np.asarray(attrs["resample_offset"])), content, pad)

  # Index maps ---------------------------------------------------------------
  def _nearest_source(self, axis: int) -> np.ndarray:
    """Source index (nearest) of each content pixel along `axis`."""
    j = np.arange(self.pad[axis], self.pad[axis] + self.content[axis])
    i = np.floor(j * self.scale[axis] + self.offset[axis] + 0.5).astype(np.int64)
    return np.clip(i, 0, self.source_shape[axis] - 1)

  def _nearest_stored(self, axis: int) -> np.ndarray:
    """Stored index (nearest, within the content) of each source pixel along `axis`."""
    i = np.arange(self.source_shape[axis])
    j = np.floor((i - self.offset[axis]) / self.scale[axis] + 0.5).astype(np.int64)
    return np.clip(j, self.pad[axis], self.pad[axis] + self.content[axis] - 1)

  def _content_slices(self):
    return tuple(slice(p, p + c) for p, c in zip(self.pad, self.content))


def nearest_index(n_in: int, n_out: int) -> np.ndarray:
  """(n_out,) int64: the input pixel (of `n_in`) whose area contains the centre of
  each output pixel, floor((i + 0.5) * n_in / n_out), when an axis is resized
  from `n_in` to `n_out` pixels over the same extent."""
  return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize_nearest(x: np.ndarray, shape) -> np.ndarray:
  """(..., H, W) -> (..., h, w) for `shape` = (h, w), nearest neighbour, same dtype.

  The two grids span the same extent (pixel areas aligned); see
  :func:`nearest_index`. Returns `x` itself when it already has `shape`.
  """
  x = np.asarray(x)
  h, w = x.shape[-2:]
  if (h, w) == tuple(shape):
    return x
  r = nearest_index(h, int(shape[0]))
  c = nearest_index(w, int(shape[1]))
  return x[..., r[:, None], c[None, :]]


def _frames(x: np.ndarray, name: str) -> tuple[np.ndarray, bool]:
  x = np.asarray(x)
  if x.ndim == 2:
    return x[None], True
  if x.ndim != 3:
    raise ValueError(f"{name}: expected (H, W) or (T, H, W), got shape {x.shape}")
  return x, False


def resample_image(img: np.ndarray, res: Resampling) -> np.ndarray:
  """(T, h, w) or (h, w) source image -> (T, S, S) / (S, S) float32, bilinear, 0 padding."""
  frames, single = _frames(img, "resample_image")
  if frames.shape[1:] != res.source_shape:
    raise ValueError(f"resample_image: shape {frames.shape[1:]} != {res.source_shape}")
  out = np.zeros((frames.shape[0], res.size, res.size), np.float32)
  sl = res._content_slices()
  matrix = np.array(res.scale)
  off = np.array([res.pad[0] * res.scale[0] + res.offset[0],
                  res.pad[1] * res.scale[1] + res.offset[1]])
  for t, f in enumerate(frames):
    out[(t,) + sl] = ndimage.affine_transform(
        f.astype(np.float64), matrix, offset=off, output_shape=res.content,
        order=1, mode="nearest")
  return out[0] if single else out


def from_source(mask: np.ndarray, res: Mapping[str, Any] | Resampling) -> np.ndarray:
  """(T, h, w) or (h, w) source labels -> stored (S, S) grid, nearest neighbour, 0 padding.

  `res`: a :class:`Resampling` or the view attributes of an HDF5 group.

  A frame that is entirely 255 (not annotated) stays entirely 255, padding included.
  """
  res = res if isinstance(res, Resampling) else Resampling.from_attrs(res)
  frames, single = _frames(mask, "from_source")
  if frames.shape[1:] != res.source_shape:
    raise ValueError(f"from_source: shape {frames.shape[1:]} != {res.source_shape}")
  out = np.zeros((frames.shape[0], res.size, res.size), frames.dtype)
  out[np.all(frames == UNANNOTATED, axis=(1, 2))] = UNANNOTATED
  out[(slice(None),) + res._content_slices()] = frames[:, res._nearest_source(0)][
      :, :, res._nearest_source(1)]
  return out[0] if single else out


def to_source(mask: np.ndarray, attrs: Mapping[str, Any] | Resampling) -> np.ndarray:
  """Stored (T, S, S) or (S, S) labels -> the source grid (T, h, w), nearest neighbour.

  `attrs`: the view attributes of the HDF5 group (or a :class:`Resampling`).
  Round trip (see tests): ``to_source(from_source(m))`` has the shape of m; it
  equals m exactly when the stored grid is finer than the source (scale <= 1),
  and otherwise at every pixel farther than ceil((scale + 1) / 2) source pixels
  (Chebyshev) from a label change.
  """
  res = attrs if isinstance(attrs, Resampling) else Resampling.from_attrs(attrs)
  frames, single = _frames(mask, "to_source")
  if frames.shape[1:] != (res.size, res.size):
    raise ValueError(f"to_source: shape {frames.shape[1:]} != ({res.size}, {res.size})")
  out = frames[:, res._nearest_stored(0)][:, :, res._nearest_stored(1)]
  return out[0] if single else out
