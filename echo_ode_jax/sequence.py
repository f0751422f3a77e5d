"""The prepared sequence: the arrays one fit consumes, built from frames and masks.

A prepared sequence (:func:`prepare_sequence`) is a dict of arrays:

  images          (T, H, W)  frames I_t in [0, 1], padded to a T bucket
  images_smooth   (T, H, W)  K * I_t (Gaussian-smoothed), precomputed
  frame_times     (T,)       t_k = k / (T_valid - 1); padded entries = 1
  frame_valid     (T,)       1 for real frames, 0 for padding
  es_index        ()         T_valid - 1 (int32)
  image_knots     (K, H, W)  I at the solver's knot times (linear in time)
  m0              (H, W, C)  one-hot initial mask m_0
  guide_es        (H, W, C)  one-hot guide m_1 at ES (zeros when no guide)
  guide_ed        (H, W, C)  one-hot guide at ED (its EF reference)
  has_guide       ()         1.0 or 0.0
"""
from __future__ import annotations

from typing import Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax import flow
from echo_ode_jax.config import FitConfig
from echo_ode_jax.kernels import gaussian_blur

NUM_CLASSES = 4


def frames_at(images, frame_times, es_index, t):
  """Images linearly interpolated in time: (T, H, W) frames -> (len(t), H, W).

  Only frames 0..es_index are used (the rest is padding).
  """
  k = jnp.clip(jnp.searchsorted(frame_times, t, side="right") - 1, 0,
               jnp.maximum(es_index - 1, 0))
  lo = frame_times[k]
  hi = frame_times[k + 1]
  w = jnp.clip((t - lo) / jnp.maximum(hi - lo, 1e-12), 0.0, 1.0)
  return images[k] * (1 - w)[:, None, None] + images[k + 1] * w[:, None, None]


def _one_hot(labels, name):
  labels = np.asarray(labels)
  if labels.ndim != 2:
    raise ValueError(f"{name}: expected an (H, W) label map, got shape {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise ValueError(f"{name}: labels must be in 0..{NUM_CLASSES - 1}")
  return np.eye(NUM_CLASSES, dtype=np.float32)[labels.astype(np.int64)]


def bucket(t: int, step: int) -> int:
  return int(-(-t // step) * step) if step > 1 else int(t)


def prepare_sequence(images, m0, guide_es=None, guide_ed=None, cfg: FitConfig = FitConfig(),
                     t_pad: int | None = None) -> dict[str, np.ndarray]:
  """Arrays of one sequence for :func:`fit_sequence` / :func:`fit_batch`.

  Args:
    images: (T, H, W) frames ED -> ES, float in [0, 1], T >= 2.
    m0: (H, W) integer initial mask (labels 0..3).
    guide_es: (H, W) guide mask m_1 at ES, or None (image similarity only).
    guide_ed: (H, W) guide at ED, the EF reference (default m0).
    t_pad: pad the frame axis to this length (default: the cfg.t_bucket multiple).
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 3:
    raise ValueError(f"images: expected (T, H, W), got shape {images.shape}")
  t, h, w = images.shape
  if t < 2:
    raise ValueError(f"images: need at least 2 frames (ED and ES), got T={t}")
  if min(h, w) < 16:
    raise ValueError(f"images: frames must be at least 16x16, got {h}x{w}")
  if not np.all(np.isfinite(images)):
    raise ValueError("images: non-finite values")
  for name, m in (("m0", m0), ("guide_es", guide_es), ("guide_ed", guide_ed)):
    if m is not None and np.shape(m) != (h, w):
      raise ValueError(f"{name}: shape {np.shape(m)} does not match frames {(h, w)}")
  t_pad = t_pad or bucket(t, cfg.t_bucket)
  if t_pad < t:
    raise ValueError(f"t_pad={t_pad} < T={t}")
  pad = t_pad - t
  frame_times = np.concatenate([np.arange(t) / (t - 1), np.ones(pad)]).astype(np.float32)
  imgs = np.concatenate([images, np.repeat(images[-1:], pad, 0)], 0)
  m0_oh = _one_hot(m0, "m0")
  has_guide = guide_es is not None
  g_es = _one_hot(guide_es, "guide_es") if has_guide else np.zeros_like(m0_oh)
  g_ed = _one_hot(guide_ed, "guide_ed") if guide_ed is not None else m0_oh
  kt = jnp.asarray(flow.knot_times(cfg.solver, cfg.dt))
  knots = frames_at(jnp.asarray(imgs), jnp.asarray(frame_times), t - 1, kt)
  smooth = gaussian_blur(jnp.asarray(imgs), cfg.sigma) if cfg.sigma > 0 else imgs
  return {
      "images": imgs, "images_smooth": np.asarray(smooth, np.float32),
      "frame_times": frame_times,
      "frame_valid": np.concatenate([np.ones(t), np.zeros(pad)]).astype(np.float32),
      "es_index": np.int32(t - 1), "image_knots": np.asarray(knots, np.float32),
      "m0": m0_oh, "guide_es": g_es, "guide_ed": g_ed,
      "has_guide": np.float32(has_guide),
  }


def shrink(x, factor: int, channels: bool):
  """Antialiased linear resize of the grid by 1 / factor: (..., H, W) (or
  (..., H, W, C) with `channels`) -> ceil(H / factor) x ceil(W / factor)."""
  lead = x.shape[:-3] if channels else x.shape[:-2]
  h, w = x.shape[len(lead):len(lead) + 2]
  shape = lead + (-(-h // factor), -(-w // factor)) + x.shape[len(lead) + 2:]
  return jax.image.resize(jnp.asarray(x), shape, "linear", antialias=True)


def downsample(seq: dict, factor: int, sigma: float) -> dict:
  """A prepared sequence on the grid ceil(H / factor) x ceil(W / factor).

  Frames, knot images and the one-hot masks are resized linearly with
  antialiasing (the masks become soft labels, so areas and Dice stay
  differentiable and unbiased); images_smooth is recomputed with a Gaussian of
  `sigma` pixels of the new grid. The scalars and the time axis are unchanged.
  Works on numpy or jax arrays (also inside jit); factor 1 returns seq.
  """
  if factor == 1:
    return seq
  out = dict(seq)
  out["images"] = shrink(seq["images"], factor, channels=False)
  out["image_knots"] = shrink(seq["image_knots"], factor, channels=False)
  out["images_smooth"] = gaussian_blur(out["images"], sigma) if sigma > 0 else out["images"]
  for k in ("m0", "guide_es", "guide_ed"):
    out[k] = shrink(seq[k], factor, channels=True)
  return out


def stack(seqs: Seq[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks prepared sequences (same T bucket and size) along a new batch axis."""
  shapes = {tuple(s["images"].shape) for s in seqs}
  if len(shapes) != 1:
    raise ValueError(f"stack: sequences must share (T_pad, H, W), got {sorted(shapes)}")
  return {k: np.stack([np.asarray(s[k]) for s in seqs]) for k in seqs[0]}


def _repad(seq, t_pad):
  """Re-pads a prepared sequence's frame axis to t_pad (no-op if equal)."""
  t_cur = seq["images"].shape[0]
  if t_cur == t_pad:
    return seq
  if t_cur > t_pad:
    raise ValueError("cannot shrink the frame axis")
  extra = t_pad - t_cur
  out = dict(seq)
  for k in ("images", "images_smooth"):
    out[k] = np.concatenate([seq[k], np.repeat(seq[k][-1:], extra, 0)], 0)
  out["frame_times"] = np.concatenate([seq["frame_times"], np.ones(extra, np.float32)])
  out["frame_valid"] = np.concatenate([seq["frame_valid"], np.zeros(extra, np.float32)])
  return out
