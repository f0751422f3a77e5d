"""Training of the 2D segmenters: data, augmentation, losses, loop, checkpoints.

Paper settings (Echo-ODE V-C): Dice loss (here optionally + cross-entropy),
Adam, batch 8, stop when the validation loss stops improving (early stopping
with ``patience`` epochs). Frames: the annotated ED/ES frames (gt != 255) of the
train split; validation on the valid split.

Workdir layout::

  config.json      TrainConfig (written before the first epoch)
  last.msgpack     params, batch_stats, optimiser state, epoch, early-stopping
                   state, history (resume point; rewritten every epoch)
  best.msgpack     params, batch_stats, epoch and validation metrics of the
                   lowest validation loss
  history.json     per-epoch train loss and validation metrics

Checkpoints are flax-serialised msgpack files, written atomically. Running
:func:`train` again on the same workdir continues after the last finished epoch.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any, Sequence

import flax
import flax.linen as nn
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from echo_ode_jax._atomic import atomic_path
from echo_ode_jax._progress import Progress
from echo_ode_jax.data.hdf5 import NUM_CLASSES, UNANNOTATED, list_keys, read_sequence
from echo_ode_jax.errors import InputError
from echo_ode_jax.metrics._dice import LABEL_STRUCTURES, annotated_frames
from echo_ode_jax.segmenters import get_model

CONFIG_FILE = "config.json"
LAST_FILE = "last.msgpack"
BEST_FILE = "best.msgpack"
HISTORY_FILE = "history.json"

# Structures scored by the validation Dice: name -> labels forming it.
STRUCTURES = LABEL_STRUCTURES


@dataclasses.dataclass
class TrainConfig:
  """Everything that defines a training run (saved as config.json).

  size: frames are resized to (size, size) (bilinear images, nearest labels).
  loss: "dice" (paper) or "dice_ce" (Dice + cross-entropy).
  Augmentation (per sample, in JAX, deterministic given seed and step):
  rotation uniform in +-rot_deg, scale log-uniform in [1/(1+scale), 1+scale],
  translation uniform in +-shift (fraction of the size), gamma log-uniform in
  [1/gamma, gamma].
  """
  model: str = "unet"
  model_kwargs: dict = dataclasses.field(default_factory=dict)
  size: int = 128
  epochs: int = 100
  batch_size: int = 8
  lr: float = 1e-3
  loss: str = "dice_ce"
  patience: int = 10
  seed: int = 0
  augment: bool = True
  rot_deg: float = 10.0
  scale: float = 0.1
  shift: float = 0.05
  gamma: float = 1.4
  valid_fraction: float = 0.1  # used without a splits file
  data: str = ""  # file name of the training data (informative)
  splits: str = ""  # file name of the splits (informative)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


# Fields that may change when a run is resumed (everything else must match).
_RESUMABLE_CHANGES = ("epochs", "patience", "data", "splits")


class TrainState(train_state.TrainState):
  batch_stats: Any = None


@dataclasses.dataclass
class ModelState:
  """A trained segmenter ready for inference: module, variables and config."""
  model: nn.Module
  variables: dict
  config: TrainConfig
  epoch: int = -1
  metrics: dict = dataclasses.field(default_factory=dict)
  jit_cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def logits(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, 1) float32 in [0, 1] -> logits (B, H, W, 4), eval mode (jitted)."""
    if "logits" not in self.jit_cache:
      model = self.model
      self.jit_cache["logits"] = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return self.jit_cache["logits"](self.variables, x)


# ----------------------------------------------------------------------------
# Data


def resize_images(img: np.ndarray, size: int) -> np.ndarray:
  """(N, H, W) float -> (N, size, size) float32, bilinear (antialiased when shrinking)."""
  img = np.asarray(img, np.float32)
  if img.shape[1:] == (size, size):
    return img
  out = jax.image.resize(jnp.asarray(img), (img.shape[0], size, size), "linear")
  return np.asarray(out, np.float32)


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
  return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def resize_labels(lbl: np.ndarray, size: int) -> np.ndarray:
  """(N, H, W) uint8 -> (N, size, size) uint8, nearest neighbour (pixel centres)."""
  if lbl.shape[1:] == (size, size):
    return np.asarray(lbl, np.uint8)
  r = _nearest_index(lbl.shape[1], size)
  c = _nearest_index(lbl.shape[2], size)
  return np.asarray(lbl, np.uint8)[:, r][:, :, c]


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


def data_size(data_h5: str | os.PathLike) -> int:
  """The frame size of a data file: root attr "size", else the first img's height."""
  with h5py.File(check_hdf5(data_h5), "r") as f:
    if "size" in f.attrs:
      return int(f.attrs["size"])
  keys = list_keys(data_h5)
  if not keys:
    raise InputError(data_h5, "no <patient>/<view> groups")
  return int(read_sequence(data_h5, keys[0]).img.shape[1])


def check_hdf5(path):
  """Returns `path`; InputError if it is missing or not HDF5."""
  if not os.path.exists(path):
    raise InputError(path, "file does not exist")
  if not h5py.is_hdf5(path):
    raise InputError(path, "not an HDF5 file")
  return path


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
# Losses and metrics


def dice_terms(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Soft-Dice sums over the batch: (intersection (C,), sum of sizes (C,)).

  Pixels labelled 255 are ignored.
  """
  c = logits.shape[-1]
  valid = (labels != UNANNOTATED)[..., None].astype(logits.dtype)
  onehot = jax.nn.one_hot(labels, c, dtype=logits.dtype) * valid
  probs = jax.nn.softmax(logits, axis=-1) * valid
  inter = jnp.sum(probs * onehot, axis=(0, 1, 2))
  sizes = jnp.sum(probs, axis=(0, 1, 2)) + jnp.sum(onehot, axis=(0, 1, 2))
  return inter, sizes


def dice_loss_from_terms(inter, sizes, smooth: float = 1.0):
  """1 - mean soft Dice of the foreground classes (1..C-1)."""
  dice = (2.0 * inter + smooth) / (sizes + smooth)
  return 1.0 - jnp.mean(dice[1:])


def ce_terms(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum of pixel cross-entropies, number of annotated pixels)."""
  valid = labels != UNANNOTATED
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
  return jnp.sum(ce * valid), jnp.sum(valid).astype(logits.dtype)


def segmentation_loss(logits: jax.Array, labels: jax.Array, loss: str = "dice_ce"
                      ) -> jax.Array:
  """Batch soft-Dice loss over the foreground classes (+ mean cross-entropy).

  logits: (B, H, W, C); labels: (B, H, W) int, 255 ignored.
  """
  if loss not in ("dice", "dice_ce"):
    raise ValueError(f"loss must be 'dice' or 'dice_ce', got {loss!r}")
  out = dice_loss_from_terms(*dice_terms(logits, labels))
  if loss == "dice_ce":
    s, n = ce_terms(logits, labels)
    out = out + s / jnp.maximum(n, 1.0)
  return out


def hard_dice(pred, gt, labels: Sequence[int]):
  """Dice of the structure made of `labels`, per sample: pred, gt (..., H, W) -> (...).

  Pixels where gt == 255 are ignored; 1.0 when the structure is absent from both.
  Works on numpy and jax arrays.
  """
  xp = jnp if isinstance(pred, jax.Array) or isinstance(gt, jax.Array) else np
  valid = gt != UNANNOTATED
  a = xp.isin(pred, xp.asarray(labels)) & valid
  b = xp.isin(gt, xp.asarray(labels)) & valid
  inter = xp.sum(a & b, axis=(-2, -1))
  size = xp.sum(a, axis=(-2, -1)) + xp.sum(b, axis=(-2, -1))
  return xp.where(size > 0, 2.0 * inter / xp.maximum(size, 1), 1.0)


# ----------------------------------------------------------------------------
# Steps


_STEP_CACHE: dict = {}  # jitted init / train / eval functions


def build_model(cfg: TrainConfig) -> nn.Module:
  """The module of `cfg`. The same instance for equal settings, so that jitted
  steps (whose static apply_fn / optimiser compare by identity) are reused."""
  key = ("model", cfg.model, json.dumps(cfg.model_kwargs, sort_keys=True))
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = get_model(cfg.model, num_classes=NUM_CLASSES, **cfg.model_kwargs)
  return _STEP_CACHE[key]


def _adam(lr: float) -> optax.GradientTransformation:
  key = ("adam", float(lr))
  if key not in _STEP_CACHE:
    _STEP_CACHE[key] = optax.adam(lr)
  return _STEP_CACHE[key]


def rng_key(seed: int) -> jax.Array:
  """A PRNG key of the "rbg" implementation for `seed`.

  Deterministic on a given backend; used instead of threefry because XLA:CPU
  compiles threefry slowly (seconds per distinct random draw in a program).
  """
  return jax.random.key(seed, impl="rbg")


def create_state(cfg: TrainConfig, seed: int = 0) -> TrainState:
  """Initialised model and Adam optimiser for `cfg` (init key: rng_key(seed))."""
  model = build_model(cfg)
  cache_key = ("init", repr(model), cfg.size)
  if cache_key not in _STEP_CACHE:
    x = jnp.zeros((1, cfg.size, cfg.size, 1), jnp.float32)
    _STEP_CACHE[cache_key] = jax.jit(lambda k: model.init(k, x, train=False))
  variables = _STEP_CACHE[cache_key](rng_key(seed))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}),
                           tx=_adam(cfg.lr))


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
    if m < batch_size:
      bi = np.concatenate([bi, np.zeros((batch_size - m,) + bi.shape[1:], bi.dtype)])
      bl = np.concatenate([bl, np.full((batch_size - m,) + bl.shape[1:], UNANNOTATED, bl.dtype)])
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
# Checkpoints


def _write_msgpack(path: str, tree) -> None:
  tree = jax.tree.map(lambda a: a if isinstance(a, (str, int, float)) else np.asarray(a), tree)
  data = flax.serialization.msgpack_serialize(tree)
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def _read_msgpack(path: str):
  try:
    with open(path, "rb") as f:
      return flax.serialization.msgpack_restore(f.read())
  except FileNotFoundError:
    raise InputError(path, "file does not exist") from None
  except Exception as e:  # noqa: BLE001 - any decoding failure is bad input
    raise InputError(path, f"not a checkpoint ({e.__class__.__name__}: {e})") from None


def read_config(workdir: str | os.PathLike) -> TrainConfig:
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      return TrainConfig.from_dict(json.load(f))
  except FileNotFoundError:
    raise InputError(path, "file does not exist (not a training workdir?)") from None
  except (json.JSONDecodeError, TypeError) as e:
    raise InputError(path, f"bad config ({e})") from None


def _save_last(workdir, state: TrainState, extra: dict) -> None:
  tree = {"params": state.params, "batch_stats": state.batch_stats,
          "opt_state": flax.serialization.to_state_dict(state.opt_state),
          "step": state.step, "extra": {"json": json.dumps(extra)}}
  _write_msgpack(os.path.join(workdir, LAST_FILE), tree)


def _restore_last(workdir, state: TrainState) -> tuple[TrainState, dict]:
  path = os.path.join(workdir, LAST_FILE)
  d = _read_msgpack(path)
  try:
    params = flax.serialization.from_state_dict(state.params, d["params"])
    stats = flax.serialization.from_state_dict(state.batch_stats, d["batch_stats"])
    opt = flax.serialization.from_state_dict(state.opt_state, d["opt_state"])
    extra = json.loads(d["extra"]["json"])
  except (KeyError, ValueError) as e:
    raise InputError(path, f"does not match the model of config.json ({e})") from None
  state = state.replace(params=params, batch_stats=stats, opt_state=opt,
                        step=int(d["step"]))
  return state, extra


def save_model(path: str | os.PathLike, state: TrainState, epoch: int, metrics: dict) -> None:
  """Writes params + batch_stats (+ epoch and metrics) to a msgpack file, atomically."""
  tree = {"params": state.params, "batch_stats": state.batch_stats,
          "extra": {"json": json.dumps({"epoch": epoch, "metrics": metrics})}}
  _write_msgpack(os.fspath(path), tree)


def load_model_state(workdir: str | os.PathLike, which: str = "best") -> ModelState:
  """The trained model of a workdir: `which` = "best" or "last" checkpoint."""
  if which not in ("best", "last"):
    raise ValueError(f"which must be 'best' or 'last', got {which!r}")
  cfg = read_config(workdir)
  path = os.path.join(workdir, BEST_FILE if which == "best" else LAST_FILE)
  d = _read_msgpack(path)
  model = build_model(cfg)
  target = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, cfg.size, cfg.size, 1)), train=False))
  try:
    variables = {"params": flax.serialization.from_state_dict(target["params"], d["params"])}
    if "batch_stats" in target:
      variables["batch_stats"] = flax.serialization.from_state_dict(target["batch_stats"],
                                                                    d["batch_stats"])
    extra = json.loads(d["extra"]["json"])
  except (KeyError, ValueError) as e:
    raise InputError(path, f"does not match the model of config.json ({e})") from None
  variables = jax.tree.map(jnp.asarray, variables)
  return ModelState(model, variables, cfg, int(extra.get("epoch", -1)),
                    extra.get("metrics", {}))


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
  cfg_path = os.path.join(workdir, CONFIG_FILE)
  # "epoch": number of finished epochs (1-based, as in best.msgpack and history).
  extra = {"epoch": 0, "best_loss": None, "bad_epochs": 0, "stopped": False, "history": []}
  if resuming:
    state, extra = _restore_last(workdir, state)
    logging.info("resuming %s after epoch %d", workdir, extra["epoch"])
  with atomic_path(cfg_path) as tmp:
    with open(tmp, "w") as f:
      f.write(cfg.to_json())

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
    order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
    if n < bs:  # tiny sets: repeat frames to fill one batch
      order = np.resize(order, bs)
    losses = []
    for i in range(steps_per_epoch):
      idx = np.sort(order[i * bs:(i + 1) * bs])
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
    _save_last(workdir, state, extra)
    _write_history(workdir, extra["history"])
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


def _write_history(workdir: str, history: list) -> None:
  with atomic_path(os.path.join(workdir, HISTORY_FILE)) as tmp:
    with open(tmp, "w") as f:
      json.dump(history, f, indent=1)

