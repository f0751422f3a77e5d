"""Training settings and model state of the 2D segmenters.

* :class:`TrainConfig`: every setting of a training run (saved as
  ``config.json`` in the workdir).
* :class:`TrainState`: flax train state (params, Adam state, step) plus the
  BatchNorm ``batch_stats``.
* :class:`ModelState`: a trained segmenter for inference (module, variables,
  config, checkpoint epoch and metrics).
* :func:`build_model`, :func:`create_state`, :func:`rng_key`: the module of a
  config, its initialised train state, and the PRNG keys used for training.

Images are (B, size, size, 1) float32 in [0, 1]; logits (B, size, size, 4)
for background, LV cavity, myocardium, LA.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from echo_ode_jax.data.hdf5 import NUM_CLASSES
from echo_ode_jax.segmenters import get_model


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


_STEP_CACHE: dict = {}  # modules, optimisers and jitted init / train / eval functions


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
