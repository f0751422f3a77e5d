"""Checkpoints and run files of a segmenter training workdir, all written atomically.

Workdir layout::

  config.json      TrainConfig (written before the first epoch)
  last.msgpack     params, batch_stats, optimiser state, step, and "extra"
                   (JSON: finished epochs, early-stopping state, history);
                   the resume point, rewritten every epoch
  best.msgpack     params, batch_stats and "extra" (JSON: epoch and validation
                   metrics) of the lowest validation loss
  history.json     per-epoch train loss, validation metrics and seconds

Checkpoints are flax-serialised msgpack files (arrays as numpy). Every file is
written through :func:`echo_ode_jax._atomic.atomic_path`, so an interrupted
write leaves the previous file. A missing or unreadable file is one
InputError line naming it.
"""
from __future__ import annotations

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax._atomic import atomic_path
from echo_ode_jax.errors import InputError
from echo_ode_jax.segmenters.state import ModelState, TrainConfig, TrainState, build_model

CONFIG_FILE = "config.json"
LAST_FILE = "last.msgpack"
BEST_FILE = "best.msgpack"
HISTORY_FILE = "history.json"


def _write_text(path: str, text: str) -> None:
  with atomic_path(path) as tmp:
    with open(tmp, "w") as f:
      f.write(text)


def write_msgpack(path: str, tree) -> None:
  """Serialises a pytree (arrays, str, int, float leaves) to `path`, atomically."""
  tree = jax.tree.map(lambda a: a if isinstance(a, (str, int, float)) else np.asarray(a), tree)
  data = flax.serialization.msgpack_serialize(tree)
  with atomic_path(path) as tmp:
    with open(tmp, "wb") as f:
      f.write(data)


def read_msgpack(path: str):
  """The pytree (nested dicts of numpy arrays) of a msgpack checkpoint."""
  try:
    with open(path, "rb") as f:
      return flax.serialization.msgpack_restore(f.read())
  except FileNotFoundError:
    raise InputError(path, "file does not exist") from None
  except Exception as e:  # noqa: BLE001 - any decoding failure is bad input
    raise InputError(path, f"not a checkpoint ({e.__class__.__name__}: {e})") from None


def read_config(workdir: str | os.PathLike) -> TrainConfig:
  """The TrainConfig of a workdir (config.json)."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      return TrainConfig.from_dict(json.load(f))
  except FileNotFoundError:
    raise InputError(path, "file does not exist (not a training workdir?)") from None
  except (json.JSONDecodeError, TypeError) as e:
    raise InputError(path, f"bad config ({e})") from None


def write_config(workdir: str | os.PathLike, cfg: TrainConfig) -> None:
  """Writes config.json of a workdir."""
  _write_text(os.path.join(workdir, CONFIG_FILE), cfg.to_json())


def save_last(workdir, state: TrainState, extra: dict) -> None:
  """Writes last.msgpack: the full train state and `extra` (JSON-serialisable)."""
  tree = {"params": state.params, "batch_stats": state.batch_stats,
          "opt_state": flax.serialization.to_state_dict(state.opt_state),
          "step": state.step, "extra": {"json": json.dumps(extra)}}
  write_msgpack(os.path.join(workdir, LAST_FILE), tree)


def restore_last(workdir, state: TrainState) -> tuple[TrainState, dict]:
  """`state` with the params, batch_stats, optimiser state and step of
  last.msgpack, and the `extra` dict saved with them."""
  path = os.path.join(workdir, LAST_FILE)
  d = read_msgpack(path)
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
  write_msgpack(os.fspath(path), tree)


def load_model_state(workdir: str | os.PathLike, which: str = "best") -> ModelState:
  """The trained model of a workdir: `which` = "best" or "last" checkpoint."""
  if which not in ("best", "last"):
    raise ValueError(f"which must be 'best' or 'last', got {which!r}")
  cfg = read_config(workdir)
  path = os.path.join(workdir, BEST_FILE if which == "best" else LAST_FILE)
  d = read_msgpack(path)
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


def write_history(workdir: str, history: list) -> None:
  """Writes history.json: one dict per finished epoch."""
  with atomic_path(os.path.join(workdir, HISTORY_FILE)) as tmp:
    with open(tmp, "w") as f:
      json.dump(history, f, indent=1)
