"""FitConfig settings from the command line: the `--config` flag, grids, row names.

One key syntax for every script: a key is a FitConfig path as in
``--config.KEY=VALUE`` (``lr``, ``lambda_ef``, ``model.use_spade``,
``model.enc_channels``), plus ``channels``, the base width c of the velocity
U-Net (encoder (c, 2c, 2c, 2c), decoder (2c x 5, c, c); the paper's network is
c = 16). Values take the field's type: bool true/false/yes/no/1/0, tuples
``16-32-32-32`` (or ``(16,32,32,32)``), and ``none`` for a field that may be
None.

* :func:`define_config_flag`: the ml_collections ``--config`` flag of a script,
  ``--config.lr=0.03 --config.model.use_spade=false`` (or ``--config=FILE.py``
  with a ``get_config()``, then overrides); :func:`fit_config` turns its value
  into a FitConfig.
* Grids (``ablate.py --grid``): ``"lambda_ef=0,1;model.use_spade=true,false"``
  is the Cartesian product of the listed values, the last key varying fastest
  (:func:`parse_grid`, :func:`apply_overrides`).
* :func:`row_id`, :func:`config_hash`, :func:`config_digest`: the names of the
  result files of a setting.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import sys
import types
import typing
from typing import Any, Mapping

from absl import flags
from ml_collections import config_dict, config_flags

from echo_ode_jax import cli, runner
from echo_ode_jax.errors import InputError
from echo_ode_jax.fit import FitConfig

#: The get_config() file behind `--config` (the FitConfig defaults).
DEFAULT_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                                   "fit.py")
#: Grid keys that are no FitConfig path: name -> what it sets.
DERIVED_KEYS = {"channels": "model.enc_channels and model.dec_channels from the base width c"}
_CHOICES = {"model.compute_dtype": ("float32", "bfloat16")}
_NOT_SETTABLE = {"log_every"}
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


# ---------------------------------------------------------------------------
# Field types (from the dataclasses' annotations)


def _hints(cls) -> dict[str, Any]:
  return typing.get_type_hints(cls)


def _optional_inner(tp):
  """X for Optional[X] / X | None, else None."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and len(typing.get_args(tp)) == 2:
      return args[0]
  return None


def field_types(cls=FitConfig, prefix: str = "") -> dict[str, Any]:
  """Dotted path -> annotated type of every leaf field ("model.pe_dim" -> int)."""
  out = {}
  for name, tp in _hints(cls).items():
    if dataclasses.is_dataclass(tp):
      out.update(field_types(tp, f"{prefix}{name}."))
    else:
      out[f"{prefix}{name}"] = tp
  return out


def grid_keys() -> list[str]:
  """Every key a grid or --config override accepts."""
  return sorted({k for k in field_types() if k not in _NOT_SETTABLE} | set(DERIVED_KEYS))


def check_key(key: str, flag: str = "--grid") -> str:
  """`key` stripped; InputError when it is neither a FitConfig path nor derived."""
  key = key.strip()
  if key in DERIVED_KEYS or (key in field_types() and key not in _NOT_SETTABLE):
    return key
  hint = (f" (did you mean model.{key}?)" if f"model.{key}" in field_types() else "")
  raise InputError(None, f"{flag}: unknown key {key!r}{hint}; known keys: "
                   f"{', '.join(grid_keys())}")


def _key_type(key: str):
  return int if key == "channels" else field_types()[key]


def parse_typed(tp, text: str):
  """`text` as a value of type `tp` (bool, int, float, str, tuple[int, ...] or
  Optional of one). Raises ValueError with a short reason."""
  t = text.strip()
  inner = _optional_inner(tp)
  if inner is not None:
    if t.lower() in ("none", ""):
      return None
    tp = inner
  if tp is bool:
    if t.lower() in _TRUE | _FALSE:
      return t.lower() in _TRUE
    raise ValueError("expected true or false" + (" or none" if inner is not None else ""))
  if tp is int:
    try:
      return int(t)
    except ValueError:
      raise ValueError("expected int") from None
  if tp is float:
    try:
      v = float(t)
    except ValueError:
      raise ValueError("expected float") from None
    if not math.isfinite(v):
      raise ValueError("not a finite number")
    return v
  if typing.get_origin(tp) is tuple:
    parts = [p for p in re.split(r"[-/x,() ]", t) if p]
    try:
      if not parts:
        raise ValueError
      return tuple(int(p) for p in parts)
    except ValueError:
      raise ValueError("expected integers separated by '-' (e.g. 16-32-32-32)") from None
  return t


def parse_value(key: str, text: str, flag: str = "--grid"):
  """One override value parsed to the type of the field behind `key`.

  Raises:
    InputError: an unknown key, a value that does not parse.
  """
  key = check_key(key, flag)
  try:
    return parse_typed(_key_type(key), text)
  except ValueError as e:
    raise InputError(None, f"{flag}: {key}={text.strip()!r}: {e}") from None


# ---------------------------------------------------------------------------
# Applying overrides


def apply_overrides(cfg: FitConfig, overrides: Mapping[str, Any]) -> FitConfig:
  """`cfg` with {key: value} overrides (as from :func:`parse_grid`) applied.

  Raises:
    ValueError: a value the config refuses (FitConfig / ModelConfig checks).
  """
  kw = {}
  for key, v in overrides.items():
    key = key.strip()
    if key == "channels":
      c = int(v)
      if c < 1:
        raise ValueError(f"channels must be >= 1, got {c}")
      kw["model.enc_channels"] = (c, 2 * c, 2 * c, 2 * c)
      kw["model.dec_channels"] = (2 * c,) * 5 + (c, c)
    else:
      if key in _CHOICES and v not in _CHOICES[key]:
        raise ValueError(f"{key} must be one of {', '.join(_CHOICES[key])}, got {v!r}")
      kw[key] = v
  return cfg.replace(**kw)


def _split_values(text: str) -> list[str]:
  """Comma-separated values; commas inside parentheses belong to a tuple."""
  out, depth, cur = [], 0, ""
  for ch in text:
    depth += (ch == "(") - (ch == ")")
    if ch == "," and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  out.append(cur)
  return [v for v in out if v.strip()]


def parse_grid(spec: str, flag: str = "--grid") -> list[dict[str, Any]]:
  """Expands a grid spec into its rows.

  Args:
    spec: ``"key=v1,v2;key2=w1"`` (keys and values as in the module docstring).
      Empty: one row without overrides.
    flag: the flag named in error messages.

  Returns:
    One {key: typed value} dict per row (keys in spec order), the Cartesian
    product with the last key varying fastest.

  Raises:
    InputError: unknown or repeated key, a malformed item, a value that does not
      parse or that the config refuses.
  """
  items = [s for s in (spec or "").split(";") if s.strip()]
  keys, values = [], []
  for item in items:
    if "=" not in item:
      raise InputError(None, f"{flag}: {item.strip()!r} is not key=v1,v2,...")
    key, vals = item.split("=", 1)
    key = check_key(key, flag)
    if key in keys:
      raise InputError(None, f"{flag}: key {key!r} given twice")
    texts = _split_values(vals)
    if not texts:
      raise InputError(None, f"{flag}: no values for {key!r}")
    parsed = [parse_value(key, v, flag) for v in texts]
    for v in parsed:
      try:
        apply_overrides(FitConfig(), {key: v})
      except ValueError as e:
        raise InputError(None, f"{flag}: {key}={format_value(v)}: {_flag_message(e)}") from None
    keys.append(key)
    values.append(parsed)
  return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def base_config(spec: str, base: FitConfig = FitConfig(), flag: str = "--grid") -> FitConfig:
  """`base` with single-valued overrides ``"steps=200;lr=0.005"`` applied.

  Raises:
    InputError: an unknown key, a bad value, or several values for a key.
  """
  rows = parse_grid(spec, flag)
  if len(rows) != 1:
    raise InputError(None, f"{flag}: give one value per key ({spec!r} makes {len(rows)} rows)")
  return apply_overrides(base, rows[0])


# ---------------------------------------------------------------------------
# The --config flag


def config_dict_of(cfg) -> config_dict.ConfigDict:
  """A dataclass config as a ConfigDict for ml_collections' config flags.

  Nested dataclasses become nested ConfigDicts; a field that may be None takes
  any literal (``--config.clip_norm=none`` or a number), the others keep their
  type (``--config.steps=2.5`` is refused while parsing the flags).
  """
  hints = _hints(type(cfg))
  d = config_dict.ConfigDict()
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v):
      d[f.name] = config_dict_of(v)
    elif _optional_inner(hints[f.name]) is not None:
      d[f.name] = config_dict.FieldReference(v, field_type=object)
    else:
      d[f.name] = v
  return d


def _flag_message(e: Exception) -> str:
  return str(e).replace("FitConfig.", "--config.").replace("ModelConfig.", "--config.model.")


def _from_values(cls, values: Mapping[str, Any], prefix: str):
  hints = _hints(cls)
  unknown = sorted(set(values) - set(hints))
  if unknown:
    raise InputError(None, f"--config: unknown field(s) {', '.join(prefix + u for u in unknown)}")
  kw = {}
  for name, v in values.items():
    tp = hints[name]
    if dataclasses.is_dataclass(tp):
      v = _from_values(tp, dict(v), f"{prefix}{name}.")
    elif isinstance(v, str) and tp is not str:
      try:
        v = parse_typed(tp, v)
      except ValueError as e:
        raise InputError(None, f"--config.{prefix}{name}={v!r}: {e}") from None
    elif _optional_inner(tp) is not None and v is not None:
      inner = _optional_inner(tp)
      v = float(v) if inner is float and isinstance(v, int) and not isinstance(v, bool) else v
    elif typing.get_origin(tp) is tuple and isinstance(v, list):
      v = tuple(v)
    kw[name] = v
  return cls(**kw)


def fit_config(value) -> FitConfig:
  """The FitConfig of a `--config` flag's value (a ConfigDict or a mapping).

  Raises:
    InputError: one line naming the `--config.KEY` of an unknown field or a
      value the config refuses.
  """
  values = value.to_dict() if isinstance(value, config_dict.ConfigDict) else dict(value)
  try:
    return _from_values(FitConfig, values, "")
  except ValueError as e:
    if isinstance(e, InputError):
      raise
    raise InputError(None, _flag_message(e)) from None


def define_config_flag(name: str = "config") -> flags.FlagHolder:
  """Defines `--config` (ml_collections): the FitConfig defaults of
  `configs/fit.py`, or ``--config=FILE.py`` (a ``get_config()``), then
  ``--config.KEY=VALUE`` overrides. Read it with :func:`fit_config`.

  Without ``--config=FILE`` ml_collections applies the overrides here, at
  definition; one naming no field exits with a one-line error.
  """
  try:
    return config_flags.DEFINE_config_file(
        name, DEFAULT_CONFIG_FILE,
        "FitConfig: a get_config() file (default: the FitConfig defaults), then "
        f"--{name}.KEY=VALUE overrides, e.g. --{name}.lr=0.03 --{name}.model.use_spade=false.")
  except (AttributeError, KeyError) as e:
    cli.exit_unknown_config_field(e, sys.argv)


def overridden(holder: flags.FlagHolder, flag_values=flags.FLAGS) -> dict[str, Any]:
  """{dotted key: value} of the `--config.KEY` overrides given on the command line."""
  return dict(flag_values[holder.name].override_values)


def config_file(holder: flags.FlagHolder, flag_values=flags.FLAGS) -> str:
  """The named setting of a `--config` flag: the file's name as given after its
  folder (``coarse_to_fine.py:64``), or "" for the FitConfig defaults."""
  flag = flag_values[holder.name]
  return os.path.basename(flag.config_filename) if flag.present else ""


def config_label(holder: flags.FlagHolder) -> str:
  """The setting of a `--config` flag in words: :func:`config_file`, then the
  `--config.KEY` overrides (:func:`row_label`), or "default"."""
  over = overridden(holder)
  return " ".join(w for w in (config_file(holder), over and row_label(over)) if w) or "default"


# ---------------------------------------------------------------------------
# Names of rows and result files


def format_value(v) -> str:
  """A value as written in grids and row names (true, 16-32-32-32, 0.5)."""
  if isinstance(v, bool):
    return str(v).lower()
  if isinstance(v, tuple):
    return "-".join(str(x) for x in v)
  return str(v)


def row_label(overrides: Mapping[str, Any]) -> str:
  """"lambda_ef=0 model.use_spade=true" (or "default" without overrides)."""
  return " ".join(f"{k}={format_value(v)}" for k, v in overrides.items()) or "default"


def config_hash(cfg: FitConfig) -> str:
  """8 hex digits identifying a full fit config."""
  return hashlib.sha1(cfg.to_json().encode()).hexdigest()[:8]


def config_digest(cfg: FitConfig) -> str:
  """8 hex digits identifying the settings of `cfg` that differ from FitConfig()'s
  defaults: a new field left at its default keeps the digest of older configs."""
  flat = lambda c: runner.flatten(json.loads(c.to_json()))
  ref = flat(FitConfig())
  diff = {k: v for k, v in flat(cfg).items() if k not in ref or ref[k] != v}
  return hashlib.sha1(json.dumps(diff, sort_keys=True).encode()).hexdigest()[:8]


def row_slug(overrides: Mapping[str, Any]) -> str:
  """The overrides as a file-name part ("lambda_ef-0.0_model.use_spade-true")."""
  slug = "_".join(f"{k}-{format_value(v)}" for k, v in overrides.items()) or "default"
  return re.sub(r"[^A-Za-z0-9._-]+", "", slug)[:80]


def row_id(overrides: Mapping[str, Any], cfg: FitConfig) -> str:
  """A folder name for a grid row: its overrides plus the hash of the full config
  (a row with other base settings is a new row instead of stale results)."""
  return f"{row_slug(overrides)}_{config_hash(cfg)}"


def same_config(saved: Mapping[str, Any], cfg: FitConfig) -> bool:
  """Whether a FitConfig saved as JSON (a dict, possibly of another version, with
  fields added or removed since) holds the settings of `cfg` (runner.dict_diff)."""
  return not runner.dict_diff(runner.saved_config(saved),
                              runner.flatten(json.loads(cfg.to_json())))
