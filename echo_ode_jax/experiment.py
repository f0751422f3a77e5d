"""Experiment plumbing: ablation grids, resumable stages, reports and figures.

Used by experiments/evaluate.py, run_table1.py, run_table2.py, ablate.py and
the demo. A *report* is three files in one folder::

  metrics.csv    one row per (method, sequence): every metric of
                 `metrics.evaluate_sequence`, plus the row's config columns
  summary.json   {method: {"summary": metrics.summarize(...), ...extra}}
  table.md       the paper's Table I layout (or Table II / ablation layouts)

Grids (ablate.py): ``"lambda_ef=0,1;spade=true,false;solver=euler,heun"`` is
the Cartesian product of the listed values, the last key varying fastest.
Keys are FitConfig fields (``steps``, ``lr``, ``solver``, ``dt``, ``sigma``,
``lambda_*``, ...), ModelConfig fields (``use_spade``, ``pe_dim``, ... or
``model.<field>``) and the aliases in :data:`GRID_ALIASES`; values are parsed
to the field's type (bool: true/false/1/0/yes/no; tuples: ``16-32-32-32``).
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import logging

from echo_ode_jax import flow, metrics
from echo_ode_jax._atomic import atomic_path
from echo_ode_jax._progress import Progress
from echo_ode_jax.data import hdf5
from echo_ode_jax.errors import InputError
from echo_ode_jax.fit import FitConfig
from echo_ode_jax import model as model_lib
from echo_ode_jax.model import ModelConfig

# ---------------------------------------------------------------------------
# Grids

#: Short grid keys -> FitConfig.replace keys. "channels" is the base width c of
#: the velocity U-Net: encoder (c, 2c, 2c, 2c), decoder (2c x 5, c, c); the
#: paper's network is c = 16.
GRID_ALIASES = {
    "spade": "model.use_spade",
    "pe": "model.use_pe",
    "i0": "model.input_i0",
    "channels": "channels",
}
_NOT_GRIDDABLE = {"model", "log_every"}


def _fields(cls) -> dict[str, Any]:
  """name -> default value of a dataclass's fields."""
  inst = cls()
  return {f.name: getattr(inst, f.name) for f in dataclasses.fields(cls)}


def grid_keys() -> list[str]:
  """Every key a grid accepts (canonical names and aliases)."""
  fit = [k for k in _fields(FitConfig) if k not in _NOT_GRIDDABLE]
  model = list(_fields(ModelConfig))
  return sorted(set(fit) | set(model) | {f"model.{k}" for k in model} | set(GRID_ALIASES))


def canonical_key(key: str) -> str:
  """The FitConfig.replace key of a grid key ("spade" -> "model.use_spade").

  Raises:
    InputError: the key is neither a FitConfig nor a ModelConfig field nor an alias.
  """
  key = key.strip()
  if key in GRID_ALIASES:
    return GRID_ALIASES[key]
  fit, model = _fields(FitConfig), _fields(ModelConfig)
  if key in fit and key not in _NOT_GRIDDABLE:
    return key
  name = key[len("model."):] if key.startswith("model.") else key
  if name in model:
    return f"model.{name}"
  raise InputError(None, f"--grid: unknown key {key!r}; known keys: {', '.join(grid_keys())}")


def _default(canon: str):
  if canon == "channels":
    return 16
  if canon.startswith("model."):
    return _fields(ModelConfig)[canon[len("model."):]]
  return _fields(FitConfig)[canon]


_OPTIONAL_KINDS = {"xla_cpu_ynn": bool, "model.conv_impl": str}   # else int (scan_steps)
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def parse_value(key: str, text: str):
  """Parses one grid value to the type of the field behind `key`.

  Raises:
    InputError: a value that does not parse, or is out of range.
  """
  canon = canonical_key(key)
  default = _default(canon)
  t = text.strip()
  bad = lambda why: InputError(None, f"--grid: {key}={t!r}: {why}")
  try:
    if isinstance(default, bool):
      if t.lower() in _TRUE:
        return True
      if t.lower() in _FALSE:
        return False
      raise bad("expected true or false")
    if isinstance(default, int):
      return int(t)
    if isinstance(default, float):
      v = float(t)
      if not math.isfinite(v):
        raise bad("not a finite number")
      return v
    if isinstance(default, tuple):
      parts = [p for p in re.split(r"[-/x]", t) if p]
      if not parts:
        raise bad("expected integers separated by '-' (e.g. 16-32-32-32)")
      return tuple(int(p) for p in parts)
    if default is None:                       # optional fields: "none" or a value
      if t.lower() in ("none", ""):
        return None
      kind = _OPTIONAL_KINDS.get(canon, int)
      if kind is bool:
        if t.lower() in _TRUE | _FALSE:
          return t.lower() in _TRUE
        raise bad("expected true, false or none")
      return kind(t)
    return t
  except InputError:
    raise
  except ValueError:
    raise bad(f"expected {type(default).__name__ if default is not None else 'int'}") from None


def _check(canon: str, key: str, v) -> None:
  bad = lambda why: InputError(None, f"--grid: {key}={v!r}: {why}")
  if canon == "solver":
    try:
      flow.knot_times(v, 0.5)
    except ValueError:
      raise bad(f"unknown solver; choose from {', '.join(flow.SOLVERS)}") from None
  elif canon in ("steps", "channels", "t_bucket") and v < 1:
    raise bad("must be >= 1")
  elif canon in ("dt", "lr") and v <= 0:
    raise bad("must be > 0")
  elif (canon.startswith("lambda_") or canon == "sigma") and v < 0:
    raise bad("must be >= 0")
  elif canon == "model.compute_dtype" and v not in ("float32", "bfloat16"):
    raise bad("choose float32 or bfloat16")
  elif canon == "model.conv_impl" and v not in (None, "native", "split", "shifted", "xla"):
    raise bad("choose native, split, shifted, xla or none")
  elif canon == "model.spade_time" and v not in model_lib.SPADE_TIME:
    raise bad(f"choose {' or '.join(model_lib.SPADE_TIME)}")


def parse_grid(spec: str) -> list[dict[str, Any]]:
  """Expands a grid spec into its rows.

  Args:
    spec: ``"key=v1,v2;key2=w1"``; keys as in the module docstring. Empty: one
      row without overrides.

  Returns:
    One {grid key: typed value} dict per row (keys as written, in spec order),
    the Cartesian product with the last key varying fastest.

  Raises:
    InputError: unknown or repeated key, a malformed item, a bad value.
  """
  items = [s for s in (spec or "").split(";") if s.strip()]
  keys, values = [], []
  for item in items:
    if "=" not in item:
      raise InputError(None, f"--grid: {item.strip()!r} is not key=v1,v2,...")
    key, vals = item.split("=", 1)
    key = key.strip()
    canon = canonical_key(key)
    if canon in [canonical_key(k) for k in keys]:
      raise InputError(None, f"--grid: key {key!r} given twice")
    texts = [v for v in vals.split(",") if v.strip()]
    if not texts:
      raise InputError(None, f"--grid: no values for {key!r}")
    parsed = [parse_value(key, v) for v in texts]
    for v in parsed:
      _check(canon, key, v)
    keys.append(key)
    values.append(parsed)
  return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def apply_overrides(cfg: FitConfig, overrides: Mapping[str, Any]) -> FitConfig:
  """`cfg` with grid overrides ({grid key: value}, as from `parse_grid`) applied."""
  kw = {}
  for key, v in overrides.items():
    canon = canonical_key(key)
    if canon == "channels":
      c = int(v)
      kw["model.enc_channels"] = (c, 2 * c, 2 * c, 2 * c)
      kw["model.dec_channels"] = (2 * c,) * 5 + (c, c)
    else:
      kw[canon] = v
  return cfg.replace(**kw)


def base_config(spec: str, base: FitConfig = FitConfig()) -> FitConfig:
  """`base` with single-valued settings ``"steps=200;lr=0.005"`` (grid keys) applied.

  Raises:
    InputError: an unknown key, a bad value, or several values for a key.
  """
  rows = parse_grid(spec)
  if len(rows) != 1:
    raise InputError(None, f"--base: give one value per key ({spec!r} makes {len(rows)} rows)")
  return apply_overrides(base, rows[0])


def _fmt(v) -> str:
  if isinstance(v, bool):
    return str(v).lower()
  if isinstance(v, tuple):
    return "-".join(str(x) for x in v)
  return str(v)


def row_label(overrides: Mapping[str, Any]) -> str:
  """"lambda_ef=0 spade=true" (or "default" without overrides)."""
  return " ".join(f"{k}={_fmt(v)}" for k, v in overrides.items()) or "default"


def config_hash(cfg: FitConfig) -> str:
  """8 hex digits identifying a full fit config."""
  return hashlib.sha1(cfg.to_json().encode()).hexdigest()[:8]


def config_digest(cfg: FitConfig) -> str:
  """8 hex digits identifying the settings of `cfg` that differ from FitConfig()'s
  defaults: a new field left at its default keeps the digest of older configs."""
  from echo_ode_jax.runner import flatten
  flat = lambda c: flatten(json.loads(c.to_json()))
  ref = flat(FitConfig())
  diff = {k: v for k, v in flat(cfg).items() if k not in ref or ref[k] != v}
  return hashlib.sha1(json.dumps(diff, sort_keys=True).encode()).hexdigest()[:8]


def row_id(overrides: Mapping[str, Any], cfg: FitConfig) -> str:
  """A folder name for a grid row: its overrides plus the hash of the full config.

  The hash makes a row with other base settings (steps, ...) a new row instead
  of reusing stale results.
  """
  slug = "_".join(f"{k}-{_fmt(v)}" for k, v in overrides.items()) or "default"
  slug = re.sub(r"[^A-Za-z0-9._-]+", "", slug)[:80]
  return f"{slug}_{config_hash(cfg)}"


# ---------------------------------------------------------------------------
# Reports


def _jsonable(x):
  """Non-finite floats -> None, numpy -> Python, recursively (strict JSON)."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, np.generic):
    x = x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def write_json(path: str | os.PathLike, obj) -> str:
  """Writes strict JSON (nan / inf as null) atomically."""
  path = os.fspath(path)
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(_jsonable(obj), f, indent=1, sort_keys=False, allow_nan=False)
  return path


def read_json(path: str | os.PathLike):
  path = os.fspath(path)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise InputError(path, "file does not exist") from None
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(path, f"not valid JSON ({e})") from None


_FIRST = ("method", "key", "status", "reason")


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
  """Writes dict rows as CSV (union of columns, first-seen order), atomically.

  Lists (notes) are joined with "; ", None as empty, floats with repr precision.
  """
  cols: list[str] = [c for c in _FIRST if any(c in r for r in rows)]
  for r in rows:
    cols.extend(k for k in r if k not in cols)
  path = os.fspath(path)
  with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(cols)
    for r in rows:
      cells = []
      for c in cols:
        v = r.get(c)
        if isinstance(v, (list, tuple)):
          v = "; ".join(str(x) for x in v)
        elif v is None:
          v = ""
        elif isinstance(v, np.generic):
          v = v.item()
        cells.append(v)
      w.writerow(cells)
  return path


def write_report(out_dir: str | os.PathLike, results: Mapping[str, Sequence[dict]],
                 extra: Mapping[str, Mapping[str, Any]] | None = None,
                 table: str | None = None, csv_columns: Mapping[str, Mapping] | None = None
                 ) -> dict[str, Any]:
  """Writes metrics.csv, summary.json and table.md for several methods.

  Args:
    results: method name -> per-sequence rows (`metrics.evaluate_files`).
    extra: method name -> more entries for its summary.json record (config, ...).
    table: the Markdown table (default: `metrics.table_markdown` of the summaries).
    csv_columns: method name -> constant columns added to its CSV rows.

  Returns:
    {method: summary} (`metrics.summarize`).
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  summaries = {name: metrics.summarize(rows) for name, rows in results.items()}
  csv_rows = []
  for name, rows in results.items():
    const = dict((csv_columns or {}).get(name, {}))
    csv_rows.extend({"method": name, **r, **const} for r in rows)
  write_csv(os.path.join(out_dir, "metrics.csv"), csv_rows)
  record = {name: {"summary": s, **dict((extra or {}).get(name, {}))}
            for name, s in summaries.items()}
  write_json(os.path.join(out_dir, "summary.json"), record)
  table = metrics.table_markdown(summaries) if table is None else table
  with atomic_path(os.path.join(out_dir, "table.md")) as tmp, open(tmp, "w") as f:
    f.write(table)
  return summaries


def method_names(preds: Sequence[str], names: Sequence[str] | None) -> list[str]:
  """One unique name per prediction file (default: the file names without .h5).

  Raises:
    InputError: a different number of names and files, or a repeated name.
  """
  if names:
    if len(names) != len(preds):
      raise InputError(None, f"--name: {len(names)} names for {len(preds)} --pred files")
    out = [n.strip() for n in names]
  else:
    out = [os.path.splitext(os.path.basename(p))[0] for p in preds]
  if len(set(out)) != len(out):
    raise InputError(None, f"method names must be unique, got {out}")
  return out


def read_summaries(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """{method: summary} from a summary.json written by :func:`write_report`."""
  d = read_json(path)
  if not isinstance(d, dict) or not all(isinstance(v, dict) and "summary" in v
                                        for v in d.values()):
    raise InputError(path, 'expected {method: {"summary": {...}}}')
  return {k: v["summary"] for k, v in d.items()}


def _isnum(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _cell(s, name, digits, ref=None, sd=None, scale=1.0):
  v = s.get(name)
  if not _isnum(v):
    return "–"
  txt = f"{v * scale:.{digits}f}"
  if ref is not None and _isnum(ref.get(name)):
    txt += f" ({(v - ref[name]) * scale:+.{digits}f})"
  if sd is not None and _isnum(s.get(sd)):
    txt += f" ± {s[sd] * scale:.{digits}f}"
  return txt


def table2_markdown(summaries: Mapping[str, Mapping[str, Any]],
                    references: Mapping[str, Mapping[str, Any] | None] | None = None,
                    label: str = "Segmentator") -> str:
  """The paper's Table II layout: value (difference to the reference row) ± sd.

  Args:
    summaries: row name -> summary (`metrics.summarize`).
    references: row name -> the summary it is compared with (e.g. the Table I
      row with the segmenter's initial mask), or None for no difference.
  """
  head = [label, "HD (mm)", "Temp. Error", "mDice", "Dice endo", "Dice epi",
          "EF MAE area (%)", "EF MAE Simpson (%)", "Failed"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "|".join(["---"] + [":-:"] * (len(head) - 1)) + "|"]
  for name, s in summaries.items():
    ref = (references or {}).get(name)
    te = f"{s.get('temporal_errors', 0)} / {s.get('n_ok', 0)}"
    if ref is not None and "temporal_errors" in ref:
      te += f" ({s.get('temporal_errors', 0) - ref['temporal_errors']:+d})"
    cells = [name, _cell(s, "hd_mean", 1, ref, "hd_sd"), te,
             _cell(s, "mdice", 3, ref), _cell(s, "dice_endo", 3, ref),
             _cell(s, "dice_epi", 3, ref),
             _cell(s, "ef_area_mae", 1, ref, "ef_area_sd"),
             _cell(s, "ef_simpson_mae", 1, ref, "ef_simpson_sd"),
             f"{s.get('n_failed', 0) + s.get('n_missing', 0)} / {s.get('n_sequences', 0)}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def ablation_markdown(rows: Sequence[tuple[Mapping[str, Any], Mapping[str, Any], float]]
                      ) -> str:
  """One line per grid row: its overrides, then the Table I metrics and fit time.

  Args:
    rows: (overrides, summary, mean fit seconds per sequence) per grid row.
  """
  keys: list[str] = []
  for o, _, _ in rows:
    keys.extend(k for k in o if k not in keys)
  head = keys + ["HD (mm)", "Temp. Error", "mDice", "Dice endo", "Dice epi",
                 "EF MAE area (%)", "fold (%)", "s / seq", "Failed"]
  lines = ["| " + " | ".join(head or ["row"]) + " |",
           "|" + "|".join([":-:"] * len(head)) + "|"]
  for o, s, sec in rows:
    cells = [_fmt(o[k]) if k in o else "" for k in keys] + [
        _cell(s, "hd_mean", 1, None, "hd_sd"),
        f"{s.get('temporal_errors', 0)} / {s.get('n_ok', 0)}",
        _cell(s, "mdice", 3), _cell(s, "dice_endo", 3), _cell(s, "dice_epi", 3),
        _cell(s, "ef_area_mae", 1, None, "ef_area_sd"),
        _cell(s, "fold_frac_mean", 3, scale=100.0),
        f"{sec:.1f}" if _isnum(sec) else "–",
        f"{s.get('n_failed', 0) + s.get('n_missing', 0)} / {s.get('n_sequences', 0)}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Resumable stages


def _stamp(path: str) -> list:
  st = os.stat(path)
  return [int(st.st_size), int(st.st_mtime_ns)]


def evaluate_cached(data: str, pred: str, cache: str) -> list[dict[str, Any]]:
  """`metrics.evaluate_files(data, pred)`, cached in the JSON file `cache`.

  The cache is reused only while both files keep their size and mtime.
  """
  stamp = {"data": _stamp(data) if os.path.exists(data) else None,
           "pred": _stamp(pred) if os.path.exists(pred) else None}
  if os.path.exists(cache):
    try:
      c = read_json(cache)
      if c.get("stamp") == stamp:
        logging.info("evaluation of %s: cached in %s", pred, cache)
        return c["rows"]
    except (InputError, AttributeError, KeyError):
      pass
  rows = metrics.evaluate_files(data, pred)
  write_json(cache, {"stamp": stamp, "rows": rows})
  return rows


def all_keys_done(out: str, keys: Sequence[str]) -> bool:
  """Whether the results file `out` exists and holds every key."""
  if not os.path.exists(out):
    return False
  try:
    have = set(hdf5.list_keys(out))
  except InputError:
    return False
  return set(keys) <= have


def stage(path: str, fn: Callable[[], Any], what: str) -> bool:
  """Runs `fn` unless `path` exists (a finished stage). Returns whether it ran."""
  if os.path.exists(path):
    logging.info("%s: done already (%s)", what, path)
    return False
  logging.info("%s -> %s", what, path)
  fn()
  if not os.path.exists(path):
    raise RuntimeError(f"{what}: stage finished without writing {path}")
  return True


def mean_fit_seconds(results_h5: str) -> float:
  """Mean of the `seconds` attr over the sequences of a fit results file (nan if none)."""
  import h5py
  secs = []
  with h5py.File(results_h5, "r") as f:
    for k in hdf5.list_keys(results_h5):
      if "seconds" in f[k].attrs:
        secs.append(float(f[k].attrs["seconds"]))
  return float(np.mean(secs)) if secs else float("nan")


# ---------------------------------------------------------------------------
# Ablation


def run_ablation(data: str, out: str, grid: str, base: FitConfig = FitConfig(),
                 init: str = "gt", guide: str = "gt", segmentation: str | None = None,
                 patients: Sequence[str] | None = None, batch_size: int = 8,
                 size: int | None = None, fit_fn: Callable | None = None
                 ) -> dict[str, Any]:
  """Fits every grid row on the same sequences, evaluates them, writes one report.

  Layout of `out`: rows/<row id>/{config.json, results.h5, eval.json} per row
  (a row with eval.json is finished and skipped on a rerun; an interrupted
  fit resumes inside runner.fit_file), and the report (metrics.csv with the
  row's overrides as columns, summary.json with each row's full config,
  table.md).

  Args:
    fit_fn: the fitter (default `runner.fit_file`; tests pass a stub).

  Returns:
    {"rows": [{"label", "id", "overrides", "ran"}], "table": markdown}.
  """
  if fit_fn is None:
    from echo_ode_jax.runner import fit_file as fit_fn
  grid_rows = parse_grid(grid)
  keys = hdf5.list_keys(data)
  if patients:
    keys = [k for k in keys if k.split("/")[0] in set(patients) or k in set(patients)]
  results, extra, const, table_rows, done = {}, {}, {}, [], []
  prog = Progress(len(grid_rows), "ablation", "row", min_interval_s=0.0)
  for i, overrides in enumerate(grid_rows):
    cfg = apply_overrides(base, overrides)
    rid = row_id(overrides, cfg)
    label = row_label(overrides)
    rdir = os.path.join(out, "rows", rid)
    os.makedirs(rdir, exist_ok=True)
    row_cfg = {"overrides": overrides, "config": json.loads(cfg.to_json()), "init": init,
               "guide": guide, "size": size, "data": os.path.basename(data),
               "segmentation": os.path.basename(segmentation) if segmentation else "",
               "patients": sorted(patients) if patients else None}
    cfg_path = os.path.join(rdir, "config.json")
    res_h5 = os.path.join(rdir, "results.h5")
    ev = os.path.join(rdir, "eval.json")
    if os.path.exists(ev) and os.path.exists(cfg_path):
      from echo_ode_jax import runner
      diff = runner.dict_diff(read_json(cfg_path), row_cfg, {"config"})   # config: in rid
      if diff:
        raise InputError(cfg_path, "this row's results were made with other settings: "
                         + ", ".join(diff) + "; use another --out")
    write_json(cfg_path, row_cfg)
    ran = False
    if not os.path.exists(ev):
      logging.info("ablation row %d/%d: %s", i + 1, len(grid_rows), label)
      fit_fn(data, res_h5, cfg, init=init, guide=guide, segmentation=segmentation,
             patients=patients, batch_size=batch_size, size=size, save_flow=True)
      rows = metrics.evaluate_files(data, res_h5, keys)
      write_json(ev, {"rows": rows, "fit_seconds": mean_fit_seconds(res_h5)})
      ran = True
    else:
      logging.info("ablation row %d/%d: %s done already", i + 1, len(grid_rows), label)
    e = read_json(ev)
    results[label] = e["rows"]
    extra[label] = {"overrides": overrides, "config": json.loads(cfg.to_json()), "id": rid}
    const[label] = {f"grid_{k}": _fmt(v) for k, v in overrides.items()}
    sec = e.get("fit_seconds")
    table_rows.append((overrides, metrics.summarize(e["rows"]),
                       float("nan") if sec is None else sec))
    done.append({"label": label, "id": rid, "overrides": overrides, "ran": ran})
    prog.update(1, extra=f"{label}: mDice {_cell(table_rows[-1][1], 'mdice', 3)}")
  table = ablation_markdown(table_rows)
  write_report(out, results, extra, table, const)
  return {"rows": done, "table": table}


# ---------------------------------------------------------------------------
# Tables I and II

SEGMENTER_NAMES = {"unet": "U-Net", "enet": "ENet", "deeplabv3": "DeepLabv3"}


def segmenter_label(name: str) -> str:
  return SEGMENTER_NAMES.get(name, name)


def echo_ode_label(segmenter: str) -> str:
  return f"Echo-ODE ({segmenter_label(segmenter)})"


def predict_stage(data: str, checkpoints: str, segmenter: str, out_h5: str,
                  which: str = "best") -> str:
  """Per-frame predictions of the trained `segmenter` (workdir checkpoints/<name>)."""
  from echo_ode_jax.segmenters import predict, train
  workdir = os.path.join(checkpoints, segmenter)
  if not os.path.exists(os.path.join(workdir, train.CONFIG_FILE)):
    raise InputError(workdir, f"no trained {segmenter} here (config.json missing); train it "
                     f"with experiments/train_segmenter.py --model={segmenter} "
                     f"--workdir={workdir}")

  def run():
    state = train.load_model_state(workdir, which)
    predict.write_predictions(state, data, out_h5)

  stage(out_h5, run, f"predict {segmenter}")
  return out_h5


def fit_stage(data: str, out_h5: str, cfg: FitConfig, init: str, guide: str,
              segmentation: str | None, batch_size: int = 8, size: int | None = None,
              save_flow: bool = True, fit_fn: Callable | None = None) -> str:
  """runner.fit_file unless `out_h5` already holds every sequence of `data`."""
  if fit_fn is None:
    from echo_ode_jax.runner import fit_file as fit_fn
  keys = hdf5.list_keys(data)
  if all_keys_done(out_h5, keys):
    from echo_ode_jax import runner
    runner.check_resume(out_h5, keys, cfg,
                        runner.run_meta(init, guide, data, segmentation, size))
    logging.info("fit -> %s: done already", out_h5)
    return out_h5
  fit_fn(data, out_h5, cfg, init=init, guide=guide, segmentation=segmentation,
         batch_size=batch_size, size=size, save_flow=save_flow)
  return out_h5


def run_table(data: str, out: str, segmenters: Sequence[str], checkpoints: str,
              init: str, cfg: FitConfig = FitConfig(), baselines: bool = True,
              reference: str | None = None, batch_size: int = 8, size: int | None = None,
              figures: bool = False, which: str = "best", fit_fn: Callable | None = None
              ) -> dict[str, Any]:
  """Table I (init="segmenter", with the 2D baselines) or Table II (init="gt").

  Stages, each leaving a file that a rerun skips:
    <out>/<seg>/pred.h5                 the 2D segmenter on every frame
    <out>/<seg>/echo_ode_init-<init>.h5 Echo-ODE, guide = the segmenter's ES
                                        (and ED) prediction, m_0 = its ED
                                        prediction or the gt ED mask
    <out>/<seg>/*.eval.json             cached evaluations
  then the report in <out>/table1 or <out>/table2 (write_report layout).

  Args:
    reference: a Table I summary.json; its "Echo-ODE (<seg>)" rows are the
      differences' reference in Table II (default <out>/table1/summary.json
      when it exists).
  """
  if init not in ("segmenter", "gt"):
    raise ValueError(f"init must be 'segmenter' or 'gt', got {init!r}")
  unknown = [s for s in segmenters if s not in SEGMENTER_NAMES]
  if unknown:
    raise InputError(None, f"--segmenters: unknown {', '.join(unknown)}; choose from "
                     f"{', '.join(SEGMENTER_NAMES)}")
  hdf5.list_keys(data)  # InputError early for a bad data file
  results, preds, extra = {}, {}, {}
  for seg in segmenters:
    sdir = os.path.join(out, seg)
    os.makedirs(sdir, exist_ok=True)
    pred = predict_stage(data, checkpoints, seg, os.path.join(sdir, "pred.h5"), which)
    if baselines:
      name = segmenter_label(seg)
      results[name] = evaluate_cached(data, pred, os.path.join(sdir, "pred.eval.json"))
      preds[name] = pred
      extra[name] = {"method": "2D", "segmenter": seg, "pred": os.path.relpath(pred, out)}
    fit_h5 = os.path.join(sdir, f"echo_ode_init-{init}.h5")
    fit_stage(data, fit_h5, cfg, init, "segmenter", pred, batch_size, size, True, fit_fn)
    name = echo_ode_label(seg) + (" init gt" if init == "gt" else "")
    results[name] = evaluate_cached(data, fit_h5, fit_h5[:-3] + ".eval.json")
    preds[name] = fit_h5
    extra[name] = {"method": "echo-ode", "segmenter": seg, "init": init, "guide": "segmenter",
                   "config": json.loads(cfg.to_json()), "pred": os.path.relpath(fit_h5, out)}
  report_dir = os.path.join(out, "table1" if init == "segmenter" else "table2")
  if init == "gt":
    ref_path = reference or os.path.join(out, "table1", "summary.json")
    refs = read_summaries(ref_path) if (reference or os.path.exists(ref_path)) else {}
    summaries = {n: metrics.summarize(r) for n, r in results.items()}
    table = table2_markdown(
        summaries, {n: refs.get(echo_ode_label(extra[n]["segmenter"])) for n in summaries})
    if not refs:
      table += "\n(no Table I summary found: differences omitted)\n"
  else:
    table = None
  summaries = write_report(report_dir, results, extra, table)
  figs = write_figures(data, preds, report_dir) if figures else []
  with open(os.path.join(report_dir, "table.md")) as f:
    table_md = f.read()
  return {"summaries": summaries, "table": table_md, "report": report_dir, "figures": figs}


# ---------------------------------------------------------------------------
# Figures from files


def _read_group(path: str, key: str) -> dict[str, Any]:
  import h5py
  with h5py.File(path, "r") as f:
    if key not in f:
      return {}
    g = f[key]
    out = {k: np.asarray(g[k][...]) for k in ("img", "gt", "pred", "flow") if k in g}
    out["attrs"] = {k: hdf5.attr_value(v) for k, v in g.attrs.items()}
  return out


def pick_key(data: str, preds: Mapping[str, str]) -> str:
  """The first sequence of `data` that every prediction file holds with status ok."""
  import h5py
  keys = hdf5.list_keys(data)
  for k in keys:
    ok = True
    for p in preds.values():
      with h5py.File(p, "r") as f:
        if k not in f or "pred" not in f[k] or hdf5.attr_value(
            f[k].attrs.get("status", "ok")) == "failed":
          ok = False
          break
    if ok:
      return k
  return keys[0]


def write_figures(data: str, preds: Mapping[str, str], out_dir: str, key: str | None = None,
                  num_frames: int = 5) -> list[str]:
  """Fig. 2 / 3b / 4 style PNGs of one sequence into `out_dir`.

  fig2_contours.png (rows: ground truth and each method; columns: frames ED ->
  ES), fig3b_lv_length.png (LV length over time), and fig4_deformation.png when
  a prediction file stores a flow (the first such method).

  Returns:
    The written paths.
  """
  from echo_ode_jax import plots
  key = key or pick_key(data, preds)
  d = _read_group(data, key)
  if "img" not in d:
    raise InputError(data, f"no img for {key}")
  img = d["img"]
  t = img.shape[0]
  spacing = tuple(float(s) for s in np.ravel(d["attrs"].get("voxelspacing", (1.0, 1.0))))
  labels: dict[str, np.ndarray] = {}
  if "gt" in d:
    labels["ground truth"] = d["gt"]
  flows = {}
  for name, p in preds.items():
    g = _read_group(p, key)
    if "pred" in g and g["pred"].shape == img.shape:
      labels[name] = g["pred"]
      if "flow" in g:
        flows[name] = g["flow"]
  frames = sorted(set(np.linspace(0, t - 1, min(num_frames, t)).round().astype(int).tolist()))
  os.makedirs(out_dir, exist_ok=True)
  paths = [plots.save(plots.contour_figure(img, labels, frames, title=key),
                      os.path.join(out_dir, "fig2_contours.png"))]
  curves = {n: plots.lv_length_mm(lab, spacing) for n, lab in labels.items()}
  paths.append(plots.save(plots.curve_figure(curves, "LV length (mm)", title=key),
                          os.path.join(out_dir, "fig3b_lv_length.png")))
  if flows:
    name, phi = next(iter(flows.items()))
    paths.append(plots.save(
        plots.registration_figure(img, phi, masks=labels[name], title=f"{name}: {key}"),
        os.path.join(out_dir, "fig4_deformation.png")))
  return paths


__all__ = [
    "GRID_ALIASES", "SEGMENTER_NAMES", "ablation_markdown", "all_keys_done",
    "apply_overrides", "base_config", "canonical_key", "config_digest", "config_hash", "echo_ode_label",
    "evaluate_cached", "fit_stage", "grid_keys", "mean_fit_seconds", "method_names",
    "parse_grid", "parse_value", "pick_key", "predict_stage", "read_json", "read_summaries",
    "row_id", "row_label", "run_ablation", "run_table", "segmenter_label", "stage",
    "table2_markdown", "write_csv", "write_figures", "write_json", "write_report",
]


def define_table_flags() -> None:
  """The absl flags shared by experiments/run_table1.py and run_table2.py."""
  from absl import flags
  flags.DEFINE_string("data", None, "Test data HDF5 (every frame annotated).", required=True)
  flags.DEFINE_string("checkpoints", None, "Folder with one segmenter workdir per model.",
                      required=True)
  flags.DEFINE_list("segmenters", ["unet", "enet", "deeplabv3"], "Segmenters (workdir names).")
  flags.DEFINE_string("out", None, "Output folder.", required=True)
  flags.DEFINE_string("base", "", 'Fit settings, e.g. "steps=1000;lr=0.01" (ablate.py keys).')
  flags.DEFINE_integer("steps", None, "Adam steps per sequence (overrides --base).")
  flags.DEFINE_integer("batch_size", 8, "Sequences per compiled fit.")
  flags.DEFINE_integer("size", None, "Fit at size x size (default: the data size).")
  flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Segmenter checkpoint.")
  flags.DEFINE_bool("figures", False, "Write the Fig. 2 / 3b / 4 style PNGs.")
