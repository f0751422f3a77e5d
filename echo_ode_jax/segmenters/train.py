"""Training loop of the 2D segmenters: jitted train / eval steps, validation, early stopping.

Paper settings (Echo-ODE V-C): Dice loss (here optionally + cross-entropy),
Adam, batch 8, stop when the validation loss stops improving (early stopping
with ``patience`` epochs). Frames: the annotated ED/ES frames (gt != 255) of the
train split, resized to (size, size); validation on the valid split.

Images are (B, size, size, 1) float32 in [0, 1], labels (B, size, size) int
(255 ignored). The workdir layout (config.json, last.msgpack, best.msgpack,
history.json) is described in :mod:`echo_ode_jax.segmenters.checkpoints`.
Running :func:`train` again on the same workdir continues after the last
finished epoch.

The pieces live in sibling modules and are re-exported here:
:mod:`~echo_ode_jax.segmenters.state` (TrainConfig, TrainState, ModelState,
model and optimiser construction), :mod:`~echo_ode_jax.segmenters.inputs`
(loading, splits, resizing, augmentation, batching),
:mod:`~echo_ode_jax.segmenters.loss` (losses, batch Dice) and
:mod:`~echo_ode_jax.segmenters.checkpoints` (workdir files).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from echo_ode_jax._progress import Progress
from echo_ode_jax.errors import InputError
from echo_ode_jax.segmenters.checkpoints import (BEST_FILE, CONFIG_FILE, HISTORY_FILE,
                                                 LAST_FILE, load_model_state, read_config,
                                                 read_msgpack, restore_last, save_last,
                                                 save_model, write_config, write_history,
                                                 write_msgpack)
from echo_ode_jax.segmenters.inputs import (augment_batch, check_hdf5, data_size,
                                            epoch_batches, load_frames, pad_batch,
                                            resize_images, resize_labels, split_keys)
from echo_ode_jax.segmenters.loss import (STRUCTURES, ce_terms, dice_loss_from_terms,
                                          dice_terms, hard_dice, segmentation_loss)
from echo_ode_jax.segmenters.state import (_RESUMABLE_CHANGES, _STEP_CACHE, ModelState,
                                           TrainConfig, TrainState, build_model,
                                           create_state, rng_key)

# ----------------------------------------------------------------------------
# Steps


def _step_fields(cfg: TrainConfig) -> str:
  d = dataclasses.asdict(cfg)
  for k in ("epochs", "patience", "seed", "valid_fraction", "data", "splits", "batch_size"):
    d.pop(k)
  return json.dumps(d, sort_keys=True)


def make_train_step(cfg: TrainConfig):
  """Jitted (state, img (B,S,S,1), lbl (B,S,S), key) -> (state, loss).

  `key` (see rng_key) drives augmentation and dropout. Cached per configuration,
  so that repeated calls of :func:`train` compile once.
  """
  cache_key = ("train", _step_fields(cfg))
  if cache_key not in _STEP_CACHE:
    _STEP_CACHE[cache_key] = _make_train_step(cfg)
  return _STEP_CACHE[cache_key]


def _make_train_step(cfg: TrainConfig):

  def step(state: TrainState, img, lbl, key):
    k_aug, k_drop = jax.random.split(key)
    lbl = lbl.astype(jnp.int32)
    if cfg.augment:
      img, lbl = augment_batch(k_aug, img, lbl, cfg)

    def loss_fn(params):
      logits, upd = state.apply_fn({"params": params, "batch_stats": state.batch_stats}, img,
                                   train=True, rngs={"dropout": k_drop},
                                   mutable=["batch_stats"])
      return segmentation_loss(logits, lbl, cfg.loss), upd

    (loss, upd), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=upd["batch_stats"])
    return state, loss

  return jax.jit(step, donate_argnums=0)


def make_eval_step(model: nn.Module):
  """Jitted (variables, img, lbl) -> (dice inter (C,), sizes (C,), ce sum, n pixels,
  per-sample hard Dice {structure: (B,)}). Cached per model."""
  cache_key = ("eval", repr(model))
  if cache_key not in _STEP_CACHE:
    _STEP_CACHE[cache_key] = _make_eval_step(model)
  return _STEP_CACHE[cache_key]


def _make_eval_step(model: nn.Module):

  def step(variables, img, lbl):
    lbl = lbl.astype(jnp.int32)
    logits = model.apply(variables, img, train=False)
    inter, sizes = dice_terms(logits, lbl)
    ce_sum, n = ce_terms(logits, lbl)
    pred = jnp.argmax(logits, axis=-1)
    dices = {k: hard_dice(pred, lbl, v) for k, v in STRUCTURES.items()}
    return inter, sizes, ce_sum, n, dices

  return jax.jit(step)


def evaluate(model: nn.Module, variables: dict, img: np.ndarray, lbl: np.ndarray,
             loss: str = "dice_ce", batch_size: int = 8, eval_step=None) -> dict:
  """Validation loss (dataset-level soft Dice [+ CE]) and mean hard Dice per structure.

  img: (N, S, S, 1); lbl: (N, S, S). The last batch is padded with ignored frames.
  """
  n = img.shape[0]
  if n == 0:
    return {}
  eval_step = eval_step or make_eval_step(model)
  inter = sizes = 0.0
  ce_sum = npix = 0.0
  dices = {k: [] for k in STRUCTURES}
  for i in range(0, n, batch_size):
    bi, bl = img[i:i + batch_size], lbl[i:i + batch_size]
    m = bi.shape[0]
    bi, bl = pad_batch(bi, bl, batch_size)
    a, b, c, d, ds = eval_step(variables, bi, bl)
    inter, sizes, ce_sum, npix = inter + a, sizes + b, ce_sum + c, npix + d
    for k in STRUCTURES:
      dices[k].append(np.asarray(ds[k])[:m])
  val = float(dice_loss_from_terms(inter, sizes))
  if loss == "dice_ce":
    val += float(ce_sum / max(float(npix), 1.0))
  out = {"loss": val}
  out.update({f"dice_{k}": float(np.mean(np.concatenate(v))) for k, v in dices.items()})
  return out


# ----------------------------------------------------------------------------
# Loop


def _check_resume(workdir: str, cfg: TrainConfig) -> None:
  old = read_config(workdir)
  # Through JSON, so that tuples and lists compare equal.
  a = json.loads(old.to_json())
  b = json.loads(cfg.to_json())
  diff = [k for k in a if k not in _RESUMABLE_CHANGES and a[k] != b[k]]
  if diff:
    raise InputError(os.path.join(workdir, CONFIG_FILE),
                     "workdir holds a run with different settings: "
                     + ", ".join(f"{k}={a[k]!r} (now {b[k]!r})" for k in diff))


def train(cfg: TrainConfig, data_h5: str | os.PathLike, workdir: str | os.PathLike,
          splits_json: str | os.PathLike | None = None, log_every_s: float = 10.0) -> dict:
  """Trains (or resumes) a segmenter; returns the best validation metrics.

  Early stopping: stops after `cfg.patience` epochs without a lower
  validation loss. Without validation frames, every epoch counts as the best.
  """
  workdir = os.fspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  cfg = dataclasses.replace(cfg, data=os.path.basename(os.fspath(data_h5)),
                            splits=os.path.basename(os.fspath(splits_json)) if splits_json else "")
  resuming = os.path.exists(os.path.join(workdir, LAST_FILE))
  if resuming:
    _check_resume(workdir, cfg)
  train_keys, valid_keys = split_keys(data_h5, splits_json, cfg.valid_fraction, cfg.seed)
  x_tr, y_tr, _ = load_frames(data_h5, train_keys, cfg.size)
  x_va, y_va, _ = load_frames(data_h5, valid_keys, cfg.size)
  if x_tr.shape[0] == 0:
    raise InputError(data_h5, "no annotated frame (gt != 255) in the train split")
  logging.info("train: %d frames from %d sequences; valid: %d frames from %d sequences",
               x_tr.shape[0], len(train_keys), x_va.shape[0], len(valid_keys))

  state = create_state(cfg, cfg.seed)
  # "epoch": number of finished epochs (1-based, as in best.msgpack and history).
  extra = {"epoch": 0, "best_loss": None, "bad_epochs": 0, "stopped": False, "history": []}
  if resuming:
    state, extra = restore_last(workdir, state)
    logging.info("resuming %s after epoch %d", workdir, extra["epoch"])
  write_config(workdir, cfg)

  if extra["stopped"] and extra["bad_epochs"] >= cfg.patience:
    logging.info("early stopping already reached at epoch %d", extra["epoch"])
    return _best_metrics(extra)
  extra["stopped"] = False

  model = build_model(cfg)
  train_step = make_train_step(cfg)
  eval_step = make_eval_step(model)
  n = x_tr.shape[0]
  bs = cfg.batch_size
  steps_per_epoch = max(1, n // bs)
  start = extra["epoch"]
  prog = Progress(max(0, cfg.epochs - start) * steps_per_epoch, f"train {cfg.model}", "step",
                  min_interval_s=log_every_s)
  base_key = rng_key(cfg.seed + 1)
  for epoch in range(start, cfg.epochs):
    t0 = time.perf_counter()
    losses = []
    for idx in epoch_batches(n, bs, cfg.seed, epoch):
      key = jax.random.fold_in(base_key, int(state.step))
      state, loss = train_step(state, x_tr[idx], y_tr[idx], key)
      losses.append(float(loss))
      prog.update(1, extra=f"epoch {epoch + 1}/{cfg.epochs} loss={np.mean(losses):.4f}")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    val = evaluate(model, variables, x_va, y_va, cfg.loss, bs, eval_step)
    val_loss = val.get("loss", float(np.mean(losses)))
    record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
              "seconds": time.perf_counter() - t0, **{f"val_{k}": v for k, v in val.items()}}
    extra["history"].append(record)
    improved = extra["best_loss"] is None or val_loss < extra["best_loss"]
    if improved:
      extra["best_loss"], extra["bad_epochs"] = val_loss, 0
      save_model(os.path.join(workdir, BEST_FILE), state, epoch + 1, val)
    else:
      extra["bad_epochs"] += 1
    extra["epoch"] = epoch + 1
    extra["stopped"] = extra["bad_epochs"] >= cfg.patience
    save_last(workdir, state, extra)
    write_history(workdir, extra["history"])
    vtxt = " ".join(f"{k}={v:.4f}" for k, v in val.items())
    prog.update(0, force=True, extra=(f"epoch {epoch + 1}/{cfg.epochs} loss={record['train_loss']:.4f} "
                                      f"val {vtxt or '(none)'}{' *best*' if improved else ''}"))
    if extra["stopped"]:
      logging.info("early stopping: no better validation loss for %d epochs", cfg.patience)
      break
  return _best_metrics(extra)


def _best_metrics(extra: dict) -> dict:
  hist = extra.get("history", [])
  if not hist:
    return {}
  key = "val_loss" if "val_loss" in hist[0] else "train_loss"
  return min(hist, key=lambda r: r[key])


__all__ = [
    # state
    "ModelState", "TrainConfig", "TrainState", "build_model", "create_state", "rng_key",
    # inputs
    "augment_batch", "check_hdf5", "data_size", "epoch_batches", "load_frames", "pad_batch",
    "resize_images", "resize_labels", "split_keys",
    # loss
    "STRUCTURES", "ce_terms", "dice_loss_from_terms", "dice_terms", "hard_dice",
    "segmentation_loss",
    # checkpoints
    "BEST_FILE", "CONFIG_FILE", "HISTORY_FILE", "LAST_FILE", "load_model_state",
    "read_config", "read_msgpack", "restore_last", "save_last", "save_model",
    "write_config", "write_history", "write_msgpack",
    # loop
    "evaluate", "make_eval_step", "make_train_step", "train",
]
