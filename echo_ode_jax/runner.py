"""File-level batch fitting: DATA.h5 -> RESULTS.h5, resumable, sharded, multi-process.

Results layout (same grid as DATA.h5's img)::

  /<patient>/<view>/pred   (T, H, W) uint8 propagated labels, every frame from
                           ED to ES (T = es_index + 1: frames after ES, if the
                           data has any, are not fitted; attr num_frames = T)
  /<patient>/<view>/flow   (T, H, W, 2) float32 phi_t, absolute (row, col) pixel
                           positions on the fitted grid (with save_flow)
  /<patient>/<view>/member_flow  (K, T, H, W, 2) the maps of an ensemble's kept
                           members, whose labels pred fuses (with save_flow and
                           FitConfig.ensemble_fusion "labels")
  attrs: status ("ok" | "failed"), reason, config (JSON), init, guide, steps,
         seconds, folding_fraction, loss_<term> (final values), fit_size,
         process_index, plus the data view's attrs (voxelspacing, ...)

Each finished batch is written atomically to its own file in `<out>.parts/`; a
rerun skips every sequence found in `<out>` or in the parts (so a kill loses at
most the batch in flight), and the parts are merged into `<out>` atomically at
the end. A sequence whose loss turns non-finite is recorded as failed with its
reason while the rest of the batch carries on.

One run per `<out>` (a lock beside it). A rerun removes the temporary files a
killed run left, moves an unreadable part aside as `*.corrupt` (its sequences
are fitted again) and stops with one line when `<out>` itself is unreadable.
A full disk stops the run with one line (OutputError); the finished parts stay.

With jax.distributed (process_count > 1), every process fits its share and
writes its own parts; process 0 merges once all processes have finished, and
every process returns once the merge is done.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import itertools
import json
import os
import time
import uuid
from typing import Any, Sequence as Seq

import h5py
import jax
import numpy as np
from absl import logging
from jax._src import distributed as jax_distributed  # the client barrier has no public wrapper
from scipy import ndimage

from echo_ode_jax import _atomic, fit as fit_lib
from echo_ode_jax._progress import Progress
from echo_ode_jax.data import hdf5
from echo_ode_jax.data.resample import resize_nearest
from echo_ode_jax.errors import InputError

INITS = ("gt", "segmenter")
GUIDES = ("segmenter", "gt", "none")
MIN_SIZE = 16         # the smallest frame side fit.prepare_sequence accepts
_IMG_TOLERANCE = 1e-3  # img must lie in [0, 1] up to this


@dataclasses.dataclass
class Inputs:
  """One sequence ready to fit (on the fitting grid)."""
  key: str
  images: np.ndarray          # (T, h, w)
  m0: np.ndarray              # (h, w)
  guide_es: np.ndarray | None
  guide_ed: np.ndarray | None
  data_shape: tuple[int, int]  # (H, W) of DATA.h5's img
  attrs: dict[str, Any]
  m0_data: np.ndarray | None = None  # (H, W) m0 on DATA.h5's grid
  guide_es_data: np.ndarray | None = None  # (H, W) the ES guide on DATA.h5's grid
  seg_data: np.ndarray | None = None  # (T, H, W) the segmentation of frames ED..ES, DATA.h5's grid


def resize(x: np.ndarray, shape: Seq[int], order: int) -> np.ndarray:
  """Resizes the last two axes of (..., H, W) to `shape` (pixel-centre aligned).

  order=1: bilinear (images); order=0: nearest (labels,
  :func:`echo_ode_jax.data.resample.resize_nearest`).
  """
  h, w = x.shape[-2:]
  if (h, w) == tuple(shape):
    return x
  if order == 0:
    return resize_nearest(x, shape)
  rr = (np.arange(shape[0]) + 0.5) * h / shape[0] - 0.5
  cc = (np.arange(shape[1]) + 0.5) * w / shape[1] - 0.5
  coords = np.stack(np.meshgrid(rr, cc, indexing="ij"))
  flat = x.reshape((-1, h, w))
  out = np.stack([ndimage.map_coordinates(f, coords, order=order, mode="nearest")
                  for f in flat])
  return out.reshape(x.shape[:-2] + tuple(shape)).astype(x.dtype)


def _frame(arr, idx, path, key, what):
  m = arr[idx]
  if np.all(m == hdf5.UNANNOTATED):
    raise InputError(path, f"{key}: {what} frame {idx} has no annotation (255)")
  if not np.any(m == 1):
    raise InputError(path, f"{key}: {what} frame {idx} has no LV cavity (label 1)")
  return m


def _index_attr(attrs, name: str, default: int, path, key) -> int:
  v = attrs.get(name, default)
  if isinstance(v, np.ndarray) and v.size == 1:
    v = v.reshape(()).item()
  if isinstance(v, float) and v.is_integer():
    v = int(v)
  if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
    raise InputError(path, f"{key}: attribute {name} must be an integer, got {v!r}")
  return int(v)


def load_inputs(data: str, key: str, init: str = "gt", guide: str = "gt",
                segmentation: str | None = None, size: int | None = None) -> Inputs:
  """Reads one sequence and its initial / guide masks; raises InputError on bad input.

  Checked: img is (T >= 2, H, W), finite, in [0, 1]; ed_index / es_index are
  integers with 0 = ed < es < T; the fitted frames are at least MIN_SIZE
  pixels a side; the masks used (gt: labels 0..3, frames all 255 when not
  annotated; segmentation: labels 0..3) match img's shape, and the initial and
  guide frames are annotated and hold an LV cavity. Each error names the file
  it is about.
  """
  if init not in INITS:
    raise ValueError(f"init must be one of {INITS}, got {init!r}")
  if guide not in GUIDES:
    raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}")
  seq = hdf5.read_sequence(data, key)
  if seq.img.ndim != 3:
    raise InputError(data, f"{key}: img must be (T, H, W), has shape {seq.img.shape}")
  t, h, w = seq.img.shape
  if t < 2:
    raise InputError(data, f"{key}: needs at least 2 frames (ED and ES), has {t}")
  if not np.all(np.isfinite(seq.img)):
    raise InputError(data, f"{key}: img has non-finite values")
  lo, hi = float(seq.img.min()), float(seq.img.max())
  if lo < -_IMG_TOLERANCE or hi > 1 + _IMG_TOLERANCE:
    raise InputError(data, f"{key}: img values span [{lo:.4g}, {hi:.4g}]; the layout "
                     "stores intensities in [0, 1]")
  fit_hw = (size, size) if size else (h, w)
  if min(fit_hw) < MIN_SIZE:
    raise InputError(data, f"{key}: frames of {fit_hw[0]}x{fit_hw[1]} pixels are too small "
                     f"to fit (at least {MIN_SIZE}x{MIN_SIZE}; see --size)")
  ed = _index_attr(seq.attrs, "ed_index", 0, data, key)
  es = _index_attr(seq.attrs, "es_index", t - 1, data, key)
  if not 0 <= ed < es < t:
    raise InputError(data, f"{key}: ed_index={ed}, es_index={es} invalid for {t} frames")
  if ed != 0:
    raise InputError(data, f"{key}: the sequence must start at ED (ed_index={ed})")
  images = seq.img[:es + 1]
  pred = None
  if "segmenter" in (init, guide):
    if not segmentation:
      raise InputError(data, f"{key}: init/guide 'segmenter' needs a segmentation file")
    pred = hdf5.read_labels(segmentation, key, "pred")
    if pred.shape != seq.img.shape:
      raise InputError(segmentation, f"{key}: pred shape {pred.shape} != img shape "
                       f"{seq.img.shape} in {os.path.basename(data)}")
    hdf5.check_labels(pred, segmentation, key, "pred", unannotated=False)
  if "gt" in (init, guide):
    if seq.gt is None:
      raise InputError(data, f"{key}: no gt mask (needed by init/guide 'gt')")
    if seq.gt.shape != seq.img.shape:
      raise InputError(data, f"{key}: gt shape {seq.gt.shape} != img shape {seq.img.shape}")
    hdf5.check_labels(seq.gt, data, key, "gt", unannotated=True)
  src = {"gt": seq.gt, "segmenter": pred}
  path_of = {"gt": data, "segmenter": segmentation}
  m0 = _frame(src[init], ed, path_of[init], key, "ED")
  g_es = g_ed = None
  if guide != "none":
    g_es = _frame(src[guide], es, path_of[guide], key, "ES")
    g_ed = _frame(src[guide], ed, path_of[guide], key, "ED")
  m0_data, g_es_data = m0, g_es
  if size and (h, w) != (size, size):
    images = resize(images, (size, size), 1)
    m0 = resize(m0, (size, size), 0)
    g_es = None if g_es is None else resize(g_es, (size, size), 0)
    g_ed = None if g_ed is None else resize(g_ed, (size, size), 0)
  return Inputs(key, images.astype(np.float32), m0, g_es, g_ed, (h, w), seq.attrs, m0_data,
                g_es_data, None if pred is None else pred[:es + 1])


def parts_dir(out: str) -> str:
  return os.fspath(out) + ".parts"


def _result_files(out: str) -> list[str]:
  """`out` (if it exists) and its parts."""
  return ([out] if os.path.exists(out) else []) + sorted(
      glob.glob(os.path.join(parts_dir(out), "*.h5")))


def _readable_keys(path: str) -> list[str]:
  try:
    return hdf5.list_keys(path)
  except InputError:
    logging.warning("ignoring unreadable results part %s", path)
    return []


def finished_keys(out: str) -> set[str]:
  """Keys already in `out` or in its parts folder."""
  return {k for path in _result_files(out) for k in _readable_keys(path)}


# FitConfig fields that change how a fit runs, not what it computes: a resume
# may change them. Every other setting must match the finished results (fields
# an older version recorded and this one lacks are not compared: dict_diff).
RESUMABLE_CHANGES = frozenset({"log_every"})
# Settings added after results were first written whose old behaviour differs
# from their default: a result that does not record them had these values.
# (A setting added whose old behaviour is its default reads as the default.)
LEGACY_DEFAULTS = {"data_grid_masks": False}
_SETTING_ATTRS = ("init", "guide", "data", "segmentation", "size")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """A nested dict (a FitConfig's JSON) with dotted keys: {"model.use_pe": ...}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def saved_config(saved: dict[str, Any]) -> dict[str, Any]:
  """A FitConfig saved as JSON by any version, flattened, with the FitConfig
  fields it does not record filled in: LEGACY_DEFAULTS' values, else today's
  defaults (a field added later reads as its default, which reproduces the
  older version's behaviour); fields since removed are kept (dict_diff skips them)."""
  return {**_default_config(), **LEGACY_DEFAULTS, **flatten(dict(saved))}


@functools.lru_cache(maxsize=1)
def _default_config() -> dict[str, Any]:
  """FitConfig()'s fields, flattened (read-only: callers copy it)."""
  return flatten(json.loads(fit_lib.FitConfig().to_json()))


def settings_diff(attrs, cfg: fit_lib.FitConfig, meta: dict[str, Any]) -> list[str]:
  """How a finished result's attrs differ from this run's settings, as
  "name=old (now new)" strings; a FitConfig field the result does not record
  (results of an older version) takes the value that version had
  (:func:`saved_config`)."""
  diff = []
  if "config" in attrs:
    old = saved_config(json.loads(attrs["config"]))
    diff += dict_diff(old, flatten(json.loads(cfg.to_json())), RESUMABLE_CHANGES)
  stored = {}
  for k in _SETTING_ATTRS:
    if k in attrs:
      v = attrs[k].item() if hasattr(attrs[k], "item") else attrs[k]
      stored[k] = v.decode() if isinstance(v, bytes) else v
  return diff + dict_diff(stored, {k: meta[k] for k in _SETTING_ATTRS if k in meta})


def dict_diff(old: dict[str, Any], new: dict[str, Any], ignore=frozenset()) -> list[str]:
  """ "key=old (now new)" for each key both record with different values (a key
  one side lacks, e.g. from another version, is not compared), except `ignore`."""
  return [f"{k}={old[k]!r} (now {new[k]!r})" for k in sorted(set(old) & set(new))
          if k not in ignore and old[k] != new[k]]


def check_resume(out: str, keys: Seq[str], cfg: fit_lib.FitConfig,
                 meta: dict[str, Any]) -> set[str]:
  """The keys of `keys` already finished in `out` (or its parts); raises
  InputError when one was fitted with other settings than (cfg, meta): a rerun
  must not mix them."""
  want, done = set(keys), set()
  for path in _result_files(out):
    have = [k for k in _readable_keys(path) if k in want]
    if not have:
      continue
    with h5py.File(path, "r") as f:
      for k in have:
        diff = settings_diff(f[k].attrs, cfg, meta)
        if diff:
          raise InputError(path, f"{k} was fitted with other settings: {', '.join(diff)}; "
                           "write to another --out, or delete this one to refit")
    done.update(have)
  return done


def run_meta(init: str, guide: str, data: str, segmentation: str | None,
             size: int | None) -> dict[str, Any]:
  """The run settings stored with every result besides the FitConfig."""
  return {"init": init, "guide": guide, "data": os.path.basename(data),
          "segmentation": os.path.basename(segmentation) if segmentation else "",
          "size": int(size or 0)}


def _write_part(out: str, results: list[tuple[Inputs, fit_lib.FitResult]],
                cfg: fit_lib.FitConfig, meta: dict[str, Any], save_flow: bool) -> str:
  os.makedirs(parts_dir(out), exist_ok=True)
  path = os.path.join(parts_dir(out),
                      f"part-p{meta['process_index']}-{uuid.uuid4().hex[:12]}.h5")
  with _atomic.atomic_h5(path, "w") as f:
    for inp, res in results:
      t = res.masks.shape[0]
      maps = res.phi if res.member_phi is None else res.member_phi   # labels fused over members
      if cfg.propagation != "forward":
        pred = fit_lib.labels_from_maps(cfg.propagation, maps, inp.m0_data,
                                        inp.guide_es_data, inp.seg_data)
      elif cfg.data_grid_masks and inp.m0_data is not None and res.masks.shape[1:] != tuple(
          inp.data_shape):
        pred = fit_lib.propagate_labels(maps, inp.m0_data)
      else:
        pred = resize(res.masks, inp.data_shape, 0)
      g = f.require_group(inp.key)
      g.create_dataset("pred", data=pred.astype(np.uint8), compression="gzip")
      if save_flow:
        g.create_dataset("flow", data=res.phi.astype(np.float32), compression="gzip")
        if res.member_phi is not None:
          g.create_dataset("member_flow", data=res.member_phi, compression="gzip")
      for k, v in inp.attrs.items():
        g.attrs[k] = v
      g.attrs.update({
          "status": "failed" if res.failed else "ok", "reason": res.reason,
          "config": cfg.to_json(), "steps": cfg.steps, "seconds": res.seconds,
          "folding_fraction": res.folding_fraction, "num_frames": t,
          "fit_size": np.asarray(res.masks.shape[1:]), "best_step": res.best_step,
          **{f"loss_{k}": v for k, v in res.final.items()}, **meta,
      })
  return path


def _check_out_readable(out: str) -> None:
  """InputError when `out` exists but is not a readable HDF5 file."""
  if not os.path.exists(out):
    return
  try:
    hdf5.list_keys(out)
  except InputError as e:
    raise InputError(out, f"not a readable HDF5 file ({e.problem}); move it aside or delete "
                     "it (its sequences are then fitted again), or choose another --out"
                     ) from None


def _set_aside(part: str, why: str) -> str:
  """Renames an unreadable part to <part>.corrupt (its sequences are fitted again)."""
  dest = part + ".corrupt"
  os.replace(part, dest)
  logging.warning("%s: unreadable results part (%s), moved to %s; its sequences will be "
                  "fitted again", part, why, os.path.basename(dest))
  return dest


def prepare_out(out: str, process_index: int = 0, process_count: int = 1) -> None:
  """Makes `out` ready for a (re)run; call it holding the run's lock.

  Removes the temporary files a killed run left (this process's parts; the
  merge's, for process 0), moves this process's unreadable parts aside as
  ``*.corrupt`` (with a warning: their sequences are fitted again), and raises
  InputError when `out` itself exists but is not a readable HDF5 file.
  """
  removed = _atomic.remove_stale_temporaries(out) if process_index == 0 else []
  mine = f"part-p{process_index}-" if process_count > 1 else "part-"
  pdir = parts_dir(out)
  if os.path.isdir(pdir):
    for p in glob.glob(os.path.join(glob.escape(pdir), f".{mine}*{_atomic.TMP_SUFFIX}")):
      with contextlib.suppress(FileNotFoundError):
        os.remove(p)
        removed.append(p)
    for p in sorted(glob.glob(os.path.join(glob.escape(pdir), f"{mine}*.h5"))):
      try:
        hdf5.list_keys(p)
      except InputError as e:
        _set_aside(p, e.problem)
  for p in removed:
    logging.warning("removed %s, a temporary file left by an interrupted run", p)
  _check_out_readable(out)


def merge(out: str) -> int:
  """Merges `<out>.parts/*.h5` into `out` (atomically) and removes the parts.

  An unreadable part is moved aside as ``*.corrupt`` with a warning (its
  sequences stay unfinished, so a rerun fits them); an unreadable `out` is an
  InputError, a full disk an OutputError, and either leaves `out` and the
  parts as they were.
  """
  parts = []
  for p in sorted(glob.glob(os.path.join(glob.escape(parts_dir(out)), "*.h5"))):
    try:
      parts.append((p, hdf5.list_keys(p)))
    except InputError as e:
      _set_aside(p, e.problem)
  if not parts:
    return 0
  _check_out_readable(out)
  n = 0
  with _atomic.atomic_h5(out, "a" if os.path.exists(out) else "w", copy_existing=True) as f:
    f.attrs["format_version"] = hdf5.FORMAT_VERSION
    for p, keys in parts:
      try:
        with h5py.File(p, "r") as src:
          for key in keys:
            if key in f:
              del f[key]
            patient = key.split("/")[0]
            src.copy(src[key], f.require_group(patient), name=key.split("/")[1])
            n += 1
      except (OSError, KeyError, RuntimeError) as e:   # a part damaged inside
        raise InputError(p, f"cannot be merged ({e.__class__.__name__}: {e}); move it aside "
                         "or delete it to fit its sequences again") from None
      _atomic.check_writes(f)
  for p, _ in parts:
    os.remove(p)
  try:
    os.rmdir(parts_dir(out))
  except OSError:
    pass
  return n


@contextlib.contextmanager
def run_lock(out: str, process_index: int = 0, process_count: int = 1):
  """One fit per `out`: an exclusive lock, or with process_count > 1 a lock
  shared by the processes of one run plus one per process index; another
  process asking for it gets a one-line InputError."""
  if process_count == 1:
    with _atomic.exclusive(out, "fitting into"):
      yield
    return
  with _atomic.exclusive(out, "fitting into", shared=True), \
      _atomic.exclusive(out, f"fitting into as process {process_index}",
                        tag=f"p{process_index}"):
    yield


def check_run_args(init: str = "gt", guide: str = "gt", batch_size: int = 8,
                   size: int | None = None, process_index: int = 0, process_count: int = 1,
                   prefix: str = "", propagation: str = "forward") -> None:
  """InputError (one line) for settings of :func:`fit_file` no run can use.

  prefix: put before the argument names (the command line's "--").
  """
  def integer(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

  if init not in INITS:
    raise InputError(None, f"{prefix}init must be one of {', '.join(INITS)}, got {init!r}")
  if guide not in GUIDES:
    raise InputError(None, f"{prefix}guide must be one of {', '.join(GUIDES)}, got {guide!r}")
  if propagation == "bidirectional" and guide == "none":
    raise InputError(None, f"propagation 'bidirectional' needs an ES mask: {prefix}guide "
                     "'gt' or 'segmenter', not 'none'")
  if propagation == "consensus" and "segmenter" not in (init, guide):
    raise InputError(None, f"propagation 'consensus' fuses a segmentation of every frame: "
                     f"{prefix}init or {prefix}guide must be 'segmenter'")
  if not integer(batch_size) or batch_size < 1:
    raise InputError(None, f"{prefix}batch_size must be an integer >= 1, got {batch_size!r}")
  if size is not None and (not integer(size) or (size != 0 and size < MIN_SIZE) or size < 0):
    raise InputError(None, f"{prefix}size must be >= {MIN_SIZE} (or unset: the data's size), "
                     f"got {size!r}")
  if not integer(process_count) or process_count < 1:
    raise InputError(None, f"process_count must be an integer >= 1, got {process_count!r}")
  if not integer(process_index) or not 0 <= process_index < process_count:
    raise InputError(None, f"process_index must be in 0..{process_count - 1}, "
                     f"got {process_index!r}")


# Generous: on a resume one process may have much more left to fit than another.
# A process that dies is detected by the coordination service's heartbeats.
_BARRIER_TIMEOUT_S = 7 * 24 * 3600
_barrier_ids = itertools.count()


def _check_distributed(process_count: int) -> None:
  if jax.process_count() != process_count:
    raise ValueError(
        f"process_count={process_count} but jax.process_count()={jax.process_count()}: "
        "merging the results of several processes needs jax.distributed.initialize "
        "(or pass merge_results=False and call merge() once all have finished)")


def _barrier(name: str) -> None:
  """Waits until every jax.distributed process reaches this barrier.

  The coordination service's barrier rather than an XLA collective
  (multihost_utils.sync_global_devices): processes reach it minutes or hours
  apart, and a CPU (gloo) collective fails when its peers are over 30 s late.
  """
  client = jax_distributed.global_state.client
  client.wait_at_barrier(f"echo_ode_jax.fit_file.{next(_barrier_ids)}.{name}",
                         timeout_in_ms=_BARRIER_TIMEOUT_S * 1000)


def _batches(inputs: list[Inputs], batch_size: int, t_bucket: int) -> list[list[Inputs]]:
  """Groups sequences of the same (T bucket, h, w) into batches."""
  groups: dict[tuple, list[Inputs]] = {}
  for inp in inputs:
    t, h, w = inp.images.shape
    groups.setdefault((fit_lib.bucket(t, t_bucket), h, w), []).append(inp)
  out = []
  for k in sorted(groups):
    g = groups[k]
    out.extend(g[i:i + batch_size] for i in range(0, len(g), batch_size))
  return out


def fit_file(data: str, out: str, cfg: fit_lib.FitConfig = fit_lib.FitConfig(),
             init: str = "gt", guide: str = "gt", segmentation: str | None = None,
             patients: Seq[str] | None = None, batch_size: int = 8,
             size: int | None = None, save_flow: bool = False, skip_bad: bool = False,
             mesh=None, process_index: int = 0, process_count: int = 1,
             merge_results: bool = True) -> dict[str, Any]:
  """Fits every sequence of `data` (or those of `patients`) and writes `out`.

  Args:
    init: initial mask m_0: "gt" (ED ground truth) or "segmenter" (ED prediction).
    guide: m_1 at ES: "segmenter" (the paper), "gt", or "none" (L_sim only).
    segmentation: a prediction file (/<patient>/<view>/pred) for "segmenter".
    size: fit at size x size (masks are mapped back to the data grid).
    mesh: a device mesh for sharding each batch (default: all local devices).
    process_index / process_count: this process takes keys[process_index::process_count].
      With process_count > 1 and merge_results, jax.distributed must be
      initialised: the processes wait for each other before and after process 0
      merges.

  Settings are checked before any work (InputError). One run per `out` (a
  second gets InputError; see :func:`run_lock`); it first cleans up after a
  killed run (:func:`prepare_out`). Bad inputs raise InputError naming the
  file, or with `skip_bad` are listed in "bad"; a full disk or an unwritable
  folder raises OutputError, keeping the finished parts.

  Returns:
    {"fitted", "skipped", "failed", "bad", "seconds"} lists / numbers.
  """
  t_start = time.perf_counter()
  check_run_args(init, guide, batch_size, size, process_index, process_count,
                 propagation=cfg.propagation)
  if process_count > 1 and merge_results:
    _check_distributed(process_count)
  keys = hdf5.list_keys(data)
  if not keys:
    raise InputError(data, "no <patient>/<view> groups")
  if patients:
    wanted = set(patients)
    keys = [k for k in keys if k.split("/")[0] in wanted or k in wanted]
    missing = wanted - {k.split("/")[0] for k in keys} - set(keys)
    if missing:
      raise InputError(data, f"patients not found: {', '.join(sorted(missing))}")
  with run_lock(out, process_index, process_count):
    prepare_out(out, process_index, process_count)
    res = _fit_keys(data, out, keys, cfg, init, guide, segmentation, batch_size, size,
                    save_flow, skip_bad, mesh, process_index, process_count, merge_results)
  return {**res, "seconds": time.perf_counter() - t_start}


def _fit_keys(data, out, keys, cfg, init, guide, segmentation, batch_size, size, save_flow,
              skip_bad, mesh, process_index, process_count, merge_results) -> dict[str, Any]:
  """fit_file's work once `out` is locked and prepared."""
  mine = keys[process_index::process_count]
  meta = {**run_meta(init, guide, data, segmentation, size), "process_index": process_index}
  done = check_resume(out, mine, cfg, meta)
  todo = [k for k in mine if k not in done]
  logging.info("fit: %d sequences for this process, %d already finished, %d to fit",
               len(mine), len(mine) - len(todo), len(todo))
  inputs, bad = [], []
  for k in todo:
    try:
      inp = load_inputs(data, k, init, guide, segmentation, size)
      try:   # the fit's own checks, before any compiling
        fit_lib.prepare_sequence(inp.images, inp.m0, inp.guide_es, inp.guide_ed, cfg)
      except ValueError as e:
        raise InputError(data, f"{k}: {e}") from None
      inputs.append(inp)
    except InputError as e:
      if not skip_bad:
        raise
      logging.warning("skipping bad input: %s", e)
      bad.append(str(e))
  if mesh is None:
    mesh = fit_lib.batch_mesh()
  fitted, failed = [], []
  prog = Progress(len(inputs), "fit_file", "sequence")
  for batch in _batches(inputs, batch_size, cfg.t_bucket):
    seqs = [fit_lib.prepare_sequence(i.images, i.m0, i.guide_es, i.guide_ed, cfg)
            for i in batch]
    keys_b = [jax.random.fold_in(jax.random.PRNGKey(cfg.seed), keys.index(i.key))
              for i in batch]
    results = fit_lib.fit_batch(seqs, cfg, keys=keys_b, mesh=mesh, progress=True)
    _write_part(out, list(zip(batch, results)), cfg, meta, save_flow)
    for i, r in zip(batch, results):
      (failed if r.failed else fitted).append(i.key)
      if r.reason:
        logging.warning("%s %s: %s", i.key, "failed" if r.failed else "fitted", r.reason)
    prog.update(len(batch), extra=f"loss {np.mean([r.final['loss'] for r in results]):.4g}")
  if merge_results:
    if process_count > 1:
      _barrier("fitted")          # every process has written its parts
    if process_index == 0:
      merge(out)
    if process_count > 1:
      _barrier("merged")          # out is complete wherever fit_file returns
  return {"fitted": fitted, "failed": failed, "bad": bad,
          "skipped": sorted(set(mine) & done)}
