"""Input pipeline of the 2D segmenters: loading, splits, resizing, augmentation, batching.

* :func:`split_keys`: the (train, valid) "<patient>/<view>" keys of a data
  file, from a splits JSON or a seeded split by patient.
* :func:`load_frames`: the annotated frames (gt != 255) of some keys, resized
  to size x size: images (N, size, size, 1) float32 in [0, 1], labels
  (N, size, size) uint8 in 0..3.
* :func:`resize_images` (bilinear, antialiased when shrinking),
  :func:`resize_labels` (nearest neighbour, pixel centres).
* :func:`augment_batch`: random rotation (degrees), scaling, translation
  (fraction of the frame size) and gamma per sample, in JAX.
* :func:`epoch_batches`, :func:`pad_batch`: the frame indices of each training
  step of an epoch, and the padding of a last, short evaluation batch.
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Sequence

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from echo_ode_jax.data.hdf5 import UNANNOTATED, list_keys, read_sequence
from echo_ode_jax.data.resample import resize_nearest
from echo_ode_jax.errors import InputError
from echo_ode_jax.metrics._dice import annotated_frames
from echo_ode_jax.segmenters.state import TrainConfig

# ----------------------------------------------------------------------------
# Files


def check_hdf5(path):
  """Returns `path`; InputError if it is missing or not HDF5."""
  if not os.path.exists(path):
    raise InputError(path, "file does not exist")
  if not h5py.is_hdf5(path):
    raise InputError(path, "not an HDF5 file")
  return path


def data_size(data_h5: str | os.PathLike) -> int:
  """The frame size of a data file: root attr "size", else the first img's height."""
  with h5py.File(check_hdf5(data_h5), "r") as f:
    if "size" in f.attrs:
      return int(f.attrs["size"])
  keys = list_keys(data_h5)
  if not keys:
    raise InputError(data_h5, "no <patient>/<view> groups")
  return int(read_sequence(data_h5, keys[0]).img.shape[1])


# ----------------------------------------------------------------------------
# Resizing


def resize_images(img: np.ndarray, size: int) -> np.ndarray:
  """(N, H, W) float -> (N, size, size) float32, bilinear (antialiased when shrinking)."""
  img = np.asarray(img, np.float32)
  if img.shape[1:] == (size, size):
    return img
  out = jax.image.resize(jnp.asarray(img), (img.shape[0], size, size), "linear")
  return np.asarray(out, np.float32)


def resize_labels(lbl: np.ndarray, size: int) -> np.ndarray:
  """(N, H, W) uint8 -> (N, size, size) uint8, nearest neighbour (pixel centres,
  :func:`echo_ode_jax.data.resample.resize_nearest`)."""
  return resize_nearest(np.asarray(lbl, np.uint8), (size, size))


# ----------------------------------------------------------------------------
# Loading and splits


def load_frames(data_h5: str | os.PathLike, keys: Sequence[str], size: int
                ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, int]]]:
  """The annotated frames of `keys`, resized to `size`.

  Returns images (N, size, size, 1) float32, labels (N, size, size) uint8 and
  the (key, frame index) of each.
  """
  imgs, lbls, ids = [], [], []
  for key in keys:
    seq = read_sequence(data_h5, key)
    if seq.gt is None:
      continue
    if seq.gt.shape != seq.img.shape:
      raise InputError(data_h5, f"{key}: gt shape {seq.gt.shape} != img shape {seq.img.shape}")
    bad = np.setdiff1d(np.unique(seq.gt), [0, 1, 2, 3, UNANNOTATED])
    if bad.size:
      raise InputError(data_h5, f"{key}/gt: labels {bad.tolist()} outside 0..3 and 255")
    t = annotated_frames(seq.gt)
    if t.size == 0:
      continue
    imgs.append(resize_images(seq.img[t], size))
    lbls.append(resize_labels(seq.gt[t], size))
    ids.extend((key, int(i)) for i in t)
  if not ids:
    return (np.zeros((0, size, size, 1), np.float32), np.zeros((0, size, size), np.uint8), [])
  return np.concatenate(imgs)[..., None], np.concatenate(lbls), ids


def _patient_id(name: str):
  """"patient0001", "patient1", "0001" -> 1; names without a number stay as they are."""
  m = re.search(r"(\d+)$", name)
  return int(m.group(1)) if m else name


def split_keys(data_h5: str | os.PathLike, splits_json: str | os.PathLike | None = None,
               valid_fraction: float = 0.1, seed: int = 0) -> tuple[list[str], list[str]]:
  """(train keys, valid keys) of an HDF5 file.

  With `splits_json` ({"train": [patients], "valid": [patients], ...}), patients
  are matched by name or, failing that, by their trailing number (so
  "patient0001" in the JSON matches "patient1" or "0001" in the file). Without
  it, a deterministic split by patient: `valid_fraction` of the sorted patients,
  chosen with a generator seeded by `seed`.
  """
  keys = list_keys(data_h5)
  if not keys:
    raise InputError(data_h5, "no <patient>/<view> groups")
  patients = sorted({k.split("/", 1)[0] for k in keys})
  if splits_json is None:
    n_valid = max(1, int(round(valid_fraction * len(patients)))) if len(patients) > 1 else 0
    order = np.random.default_rng(seed).permutation(len(patients))
    valid = {patients[i] for i in order[:n_valid]}
    return ([k for k in keys if k.split("/", 1)[0] not in valid],
            [k for k in keys if k.split("/", 1)[0] in valid])
  try:
    with open(splits_json) as f:
      spl = json.load(f)
  except FileNotFoundError:
    raise InputError(splits_json, "file does not exist") from None
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(splits_json, f"not valid JSON ({e})") from None
  if not isinstance(spl, dict) or not all(isinstance(spl.get(s), list) for s in ("train", "valid")):
    raise InputError(splits_json, 'needs lists "train" and "valid" of patient names')
  by_name = {p: p for p in patients}
  by_id = {}
  for p in patients:
    by_id.setdefault(_patient_id(p), p)

  def resolve(names):
    out = set()
    for n in names:
      n = str(n)
      p = by_name.get(n) or by_id.get(_patient_id(n))
      if p is not None:
        out.add(p)
    return out

  train_p, valid_p = resolve(spl["train"]), resolve(spl["valid"])
  both = train_p & valid_p
  if both:
    raise InputError(splits_json, f"patients in both train and valid: {sorted(both)[:5]}")
  if not train_p:
    raise InputError(splits_json, f"no train patient found in {os.fspath(data_h5)}")
  missing = len(spl["train"]) + len(spl["valid"]) - len(train_p) - len(valid_p)
  if missing:
    logging.warning("%d patients of %s are not in %s", missing, splits_json, data_h5)
  return ([k for k in keys if k.split("/", 1)[0] in train_p],
          [k for k in keys if k.split("/", 1)[0] in valid_p])


# ----------------------------------------------------------------------------
# Augmentation (JAX)


def _augment_one(key, img, lbl, rot_deg, scale, shift, gamma):
  """img (H, W, 1) float, lbl (H, W) int32 -> augmented pair (same shapes)."""
  h, w = lbl.shape
  k_rot, k_scale, k_shift, k_gamma = jax.random.split(key, 4)
  theta = jnp.deg2rad(jax.random.uniform(k_rot, (), minval=-rot_deg, maxval=rot_deg))
  ls = jnp.log1p(scale)
  s = jnp.exp(jax.random.uniform(k_scale, (), minval=-ls, maxval=ls))
  t = jax.random.uniform(k_shift, (2,), minval=-shift, maxval=shift) * jnp.array([h, w])
  lg = jnp.log(gamma)
  g = jnp.exp(jax.random.uniform(k_gamma, (), minval=-lg, maxval=lg))
  # Output pixel p samples the input at c + R(-theta) (p - c - t) / s.
  c = jnp.array([(h - 1) / 2.0, (w - 1) / 2.0])
  rr, cc = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32),
                        indexing="ij")
  dr, dc = rr - c[0] - t[0], cc - c[1] - t[1]
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  src_r = c[0] + (cos * dr + sin * dc) / s
  src_c = c[1] + (-sin * dr + cos * dc) / s
  img_w = jax.scipy.ndimage.map_coordinates(img[..., 0], [src_r, src_c], order=1,
                                            mode="constant", cval=0.0)
  lbl_w = jax.scipy.ndimage.map_coordinates(lbl.astype(jnp.float32), [src_r, src_c],
                                            order=0, mode="constant", cval=0.0)
  img_w = jnp.clip(img_w, 0.0, 1.0) ** g
  return img_w[..., None], lbl_w.astype(jnp.int32)


def augment_batch(key: jax.Array, img: jax.Array, lbl: jax.Array, cfg: TrainConfig
                  ) -> tuple[jax.Array, jax.Array]:
  """Random rotation, scaling, translation and gamma per sample.

  img: (B, H, W, 1) in [0, 1]; lbl: (B, H, W) int. Labels use nearest sampling;
  pixels from outside the frame become background (image 0).
  """
  keys = jax.random.split(key, img.shape[0])
  fn = functools.partial(_augment_one, rot_deg=cfg.rot_deg, scale=cfg.scale,
                         shift=cfg.shift, gamma=cfg.gamma)
  return jax.vmap(fn)(keys, img, lbl)


# ----------------------------------------------------------------------------
# Batching


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
  """The sorted frame indices of each training step of `epoch`.

  max(1, n // batch_size) batches of `batch_size` indices each, drawn from a
  permutation seeded by (seed, epoch); the frames left over are not used in
  that epoch. With fewer than `batch_size` frames, frames repeat to fill one
  batch.
  """
  order = np.random.default_rng([seed, epoch]).permutation(n)
  if n < batch_size:  # tiny sets: repeat frames to fill one batch
    order = np.resize(order, batch_size)
  return [np.sort(order[i * batch_size:(i + 1) * batch_size])
          for i in range(max(1, n // batch_size))]


def pad_batch(img: np.ndarray, lbl: np.ndarray, batch_size: int
              ) -> tuple[np.ndarray, np.ndarray]:
  """Pads a short batch, img (m, S, S, 1) and lbl (m, S, S), to `batch_size`
  frames with zero images and unannotated (255) labels."""
  m = img.shape[0]
  if m < batch_size:
    img = np.concatenate([img, np.zeros((batch_size - m,) + img.shape[1:], img.dtype)])
    lbl = np.concatenate([lbl, np.full((batch_size - m,) + lbl.shape[1:], UNANNOTATED,
                                       lbl.dtype)])
  return img, lbl
