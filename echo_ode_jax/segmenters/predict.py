"""Per-frame prediction with a trained segmenter, in the fit-result layout.

Output file: ``/<patient>/<view>/pred`` (T, H, W) uint8 labels for every frame,
the view attributes of the input copied, plus ``pred_model`` (model name),
``pred_config`` (the training config as JSON), ``pred_checkpoint_epoch`` and
``pred_resized`` (whether frames were resized); root attrs ``format_version``
and ``size`` as in the input.

Size: when the frames are not (size, size) for the trained ``size``, they are
resized bilinearly to it, the logits are resized bilinearly back to the
original (H, W), and the argmax is taken there.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import h5py
import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax._atomic import atomic_h5, check_writes
from echo_ode_jax._progress import Progress
from echo_ode_jax.data.hdf5 import FORMAT_VERSION, list_keys, read_sequence
from echo_ode_jax.errors import InputError
from echo_ode_jax.segmenters.inputs import check_hdf5
from echo_ode_jax.segmenters.state import ModelState


def _predict_fn(model_state: ModelState, out_hw: tuple[int, int]):
  """Jitted (variables, x (B, h, w, 1)) -> labels (B, H, W) uint8."""
  cache = model_state.jit_cache
  if out_hw not in cache:
    size = model_state.config.size
    model = model_state.model

    def fn(variables, x):
      if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 1), "linear")
      logits = model.apply(variables, x, train=False)
      if logits.shape[1:3] != out_hw:
        logits = jax.image.resize(logits, (x.shape[0],) + out_hw + (logits.shape[-1],),
                                  "linear")
      return jnp.argmax(logits, axis=-1).astype(jnp.uint8)

    cache[out_hw] = jax.jit(fn)
  return cache[out_hw]


def predict_frames(model_state: ModelState, img: np.ndarray, batch_size: int = 16
                   ) -> np.ndarray:
  """img: (T, H, W) float32 in [0, 1] -> labels (T, H, W) uint8 (eval mode)."""
  img = np.asarray(img, np.float32)
  if img.ndim != 3:
    raise ValueError(f"expected (T, H, W) frames, got shape {img.shape}")
  t, h, w = img.shape
  fn = _predict_fn(model_state, (h, w))
  out = np.empty((t, h, w), np.uint8)
  for i in range(0, t, batch_size):
    x = img[i:i + batch_size]
    m = x.shape[0]
    b = min(batch_size, 1 << (m - 1).bit_length())  # pad to a power of two: few compilations
    if m < b:
      x = np.concatenate([x, np.zeros((b - m, h, w), np.float32)])
    out[i:i + m] = np.asarray(fn(model_state.variables, x[..., None]))[:m]
  return out


def iter_predictions(model_state: ModelState, data_h5: str | os.PathLike,
                     keys: Sequence[str] | None = None, batch_size: int = 16
                     ) -> Iterator[tuple[str, np.ndarray, dict]]:
  """Yields (key, labels (T, H, W) uint8, view attrs) for each sequence."""
  for key in (list(keys) if keys is not None else list_keys(data_h5)):
    seq = read_sequence(data_h5, key)
    if seq.img.ndim != 3:
      raise InputError(data_h5, f"{key}/img: expected (T, H, W), got {seq.img.shape}")
    yield key, predict_frames(model_state, seq.img, batch_size), seq.attrs


def predict_sequences(model_state: ModelState, data_h5: str | os.PathLike,
                      keys: Sequence[str] | None = None, batch_size: int = 16
                      ) -> dict[str, np.ndarray]:
  """{key: (T, H, W) uint8 labels} for every frame of `keys` (default: all)."""
  return {k: p for k, p, _ in iter_predictions(model_state, data_h5, keys, batch_size)}


def write_predictions(model_state: ModelState, data_h5: str | os.PathLike,
                      out_h5: str | os.PathLike, keys: Sequence[str] | None = None,
                      batch_size: int = 16) -> list[str]:
  """Predicts every frame of `keys` (default: all) into `out_h5`, atomically
  (:func:`echo_ode_jax._atomic.atomic_h5`: on any error, a full disk included,
  `out_h5` is left as it was and no temporary file remains).

  Returns the keys written.
  """
  keys = list(keys) if keys is not None else list_keys(data_h5)
  with h5py.File(check_hdf5(data_h5), "r") as f:
    root = {k: f.attrs[k] for k in f.attrs}
  cfg = model_state.config
  prog = Progress(len(keys), f"predict {cfg.model}", "sequence")
  frames = 0
  with atomic_h5(out_h5) as out:
    out.attrs["format_version"] = root.get("format_version", FORMAT_VERSION)
    if "size" in root:
      out.attrs["size"] = root["size"]
    for key, pred, attrs in iter_predictions(model_state, data_h5, keys, batch_size):
      patient, view = key.split("/", 1)
      g = out.require_group(patient).create_group(view)
      g.create_dataset("pred", data=pred, compression="gzip")
      for k, v in attrs.items():
        g.attrs[k] = v
      g.attrs["pred_model"] = cfg.model
      g.attrs["pred_config"] = cfg.to_json()
      g.attrs["pred_checkpoint_epoch"] = int(model_state.epoch)
      g.attrs["pred_resized"] = bool(pred.shape[1:] != (cfg.size, cfg.size))
      check_writes(out)      # a full disk stops here
      frames += pred.shape[0]
      prog.update(1, extra=f"{frames} frames, {frames / max(prog.elapsed, 1e-9):.3g} frames/s")
  return keys


__all__ = ["iter_predictions", "predict_frames", "predict_sequences", "write_predictions"]
