"""The project's HDF5 layout (a fixed contract; other tools read it).

::

  /<patient>/<view>/img   (T, H, W) float32 in [0, 1]
  /<patient>/<view>/gt    (T, H, W) uint8 labels; 255 = frame without annotation
                          (absent if the source has no masks)
  /<patient>/<view>/pred  (T, H, W) uint8 labels (prediction / fit result files)
  attrs on <view>: voxelspacing (2,) mm per pixel at the stored size (row, col);
                   ed_index, es_index (0-based); source_shape (2,);
                   source_voxelspacing (2,); every Info cfg field, lower-case keys
  root attrs: format_version, size

Written by the CAMUS converter (convert.py) on <view>, to map stored masks back
to the source grid (resample.to_source): resample_scale (2,) source pixels per
stored pixel, resample_offset (2,) source coordinate of stored pixel 0,
content_shape (2,) and pad (2,) (the non-padded stored block), stored_shape
(2,), source_kind ("half_sequence", "sequence", "ed_es"). The cfg's 1-based
ED / ES frame numbers stay as `ed` / `es`.

The converter also stores source_folder on <view>: the patient folder it read
(a rerun into the same output from another folder is refused). Fit results
(runner.py) add status, reason, config and the other attrs of
RESERVED_VIEW_ATTRS on their <view> groups.

Synthetic files (synthetic.py) add ef_true on <view> and the dataset
  /<patient>/<view>/flow_true  (T, H, W, 2) float32 true pull-back maps,
                               absolute (row, col) pixels: gt[t](p) = gt[0](flow_true[t, p])

T runs from ED to ES. Labels: 0 background, 1 LV cavity, 2 myocardium, 3 LA.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator

import h5py
import numpy as np

from echo_ode_jax.errors import InputError

FORMAT_VERSION = 1
UNANNOTATED = 255
LABELS = {0: "background", 1: "lv", 2: "myo", 3: "la"}
NUM_CLASSES = 4

# View attributes and member names that the project's tools set or read
# themselves: a source's own fields (a CAMUS Info cfg) may not take these names.
RESERVED_VIEW_ATTRS = frozenset({
    # converter
    "voxelspacing", "source_voxelspacing", "source_shape", "ed_index", "es_index",
    "resample_scale", "resample_offset", "content_shape", "pad", "stored_shape",
    "source_kind", "source_folder",
    # fit results (runner.py) and evaluation (status / reason / error / message)
    "status", "reason", "error", "message", "config", "init", "guide", "steps", "seconds",
    "folding_fraction", "num_frames", "fit_size", "best_step", "process_index", "data",
    "segmentation", "size",
    # synthetic files
    "ef_true",
    # datasets of a view group
    "img", "gt", "pred", "flow", "flow_true",
})
RESERVED_VIEW_ATTR_PREFIXES = ("loss_",)


def is_reserved_attr(name: str) -> bool:
  """Whether a view attribute name is one the project's tools set or read themselves."""
  name = name.lower()
  return name in RESERVED_VIEW_ATTRS or name.startswith(RESERVED_VIEW_ATTR_PREFIXES)


@dataclasses.dataclass
class Sequence:
  """One view of one patient, frames ED -> ES.

  img: (T, H, W) float32 in [0, 1]. gt: (T, H, W) uint8 or None (255 =
  frame not annotated). attrs: the view attributes (voxelspacing in mm/pixel).
  """
  patient: str
  view: str
  img: np.ndarray
  gt: np.ndarray | None
  attrs: dict[str, Any]

  @property
  def key(self) -> str:
    return f"{self.patient}/{self.view}"

  @property
  def num_frames(self) -> int:
    return int(self.img.shape[0])


def attr_value(v):
  """An HDF5 attribute as a plain Python value (bytes decoded, numpy scalars unboxed)."""
  if isinstance(v, bytes):
    return v.decode()
  if isinstance(v, np.generic):
    return v.item()
  return v


def group_keys(f: h5py.File) -> list[str]:
  """All "<patient>/<view>" groups of an open file, sorted."""
  return [f"{p}/{v}" for p in sorted(f) if isinstance(f[p], h5py.Group)
          for v in sorted(f[p]) if isinstance(f[p][v], h5py.Group)]


def list_keys(path: str | os.PathLike) -> list[str]:
  """All "<patient>/<view>" groups in an HDF5 file, sorted."""
  with open_h5(path) as f:
    return group_keys(f)


def open_h5(path, mode="r"):
  """h5py.File, or a one-line InputError naming the file."""
  path = os.fspath(path)
  if mode == "r" and not os.path.exists(path):
    raise InputError(path, "file does not exist")
  try:
    return h5py.File(path, mode)
  except OSError as e:
    raise InputError(path, f"cannot open as HDF5 ({e.__class__.__name__}: {e})") from None


def read_sequence(path: str | os.PathLike, key: str, dataset: str = "img") -> Sequence:
  """Reads one "<patient>/<view>" group. `dataset` names the image array."""
  with open_h5(path) as f:
    if key not in f:
      raise InputError(path, f"no group {key!r}")
    g = f[key]
    if not isinstance(g, h5py.Group):
      raise InputError(path, f"{key} is not a group")
    if dataset not in g:
      raise InputError(path, f"{key}: missing dataset {dataset!r}")
    try:
      img = np.asarray(g[dataset][...], np.float32)
      gt = label_values(g["gt"], path, key, "gt") if "gt" in g else None
      attrs = {k: attr_value(v) for k, v in g.attrs.items()}
    except (OSError, TypeError, ValueError) as e:
      if isinstance(e, InputError):
        raise
      raise InputError(path, f"{key}: cannot read ({e.__class__.__name__}: {e})") from None
  patient, view = key.split("/", 1)
  return Sequence(patient, view, img, gt, attrs)


def iter_sequences(path: str | os.PathLike, keys: list[str] | None = None
                   ) -> Iterator[Sequence]:
  """Yields every sequence (or those in `keys`) of a file."""
  for k in keys if keys is not None else list_keys(path):
    yield read_sequence(path, k)


def label_values(d: h5py.Dataset, path, key: str, name: str) -> np.ndarray:
  """A label dataset as uint8; InputError when its values are not labels (a
  float or negative value, or one over 255, would change when cast)."""
  a = d[...]
  if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_)):
    raise InputError(path, f"{key}: {name} has dtype {a.dtype}, expected integer labels")
  if a.size and (a.min() < 0 or a.max() > 255):
    raise InputError(path, f"{key}: {name} has values outside 0..255 "
                     f"({a.min()}..{a.max()})")
  return np.asarray(a, np.uint8)


def check_labels(arr: np.ndarray, path, key: str, name: str, unannotated: bool,
                 lv_cavity: bool = False, explain_255: bool = False) -> None:
  """InputError unless the (T, H, W) label maps `arr` (dataset `name` of group
  `key` in file `path`) hold labels 0..3 only.

  unannotated: 255 is allowed too, on whole frames only (a frame mixing 255
  with labels is an error). lv_cavity (with unannotated): every annotated
  frame needs an LV cavity (label 1). explain_255: the message names 255 as
  "255 (not annotated)".
  """
  allowed = set(range(NUM_CLASSES)) | ({UNANNOTATED} if unannotated else set())
  bad = sorted(set(np.unique(arr).tolist()) - allowed)
  if bad:
    also = (" and 255" + (" (not annotated)" if explain_255 else "")) if unannotated else ""
    raise InputError(path, f"{key}: {name} has labels outside 0..{NUM_CLASSES - 1}{also}: "
                     f"{bad[:8]}")
  if unannotated:
    for t, frame in enumerate(arr):
      unann = frame == UNANNOTATED
      if unann.any() and not unann.all():
        raise InputError(path, f"{key}: {name} frame {t} mixes 255 (not annotated) with labels")
      if lv_cavity and not unann.any() and not (frame == 1).any():
        raise InputError(path, f"{key}: {name} frame {t} has no LV cavity (label 1)")


def read_labels(path: str | os.PathLike, key: str, dataset: str = "pred") -> np.ndarray:
  """Reads a (T, H, W) uint8 label dataset ("pred" or "gt") of one group.

  InputError when it is missing or unreadable, or holds values that are not
  integer labels (floats, negative numbers or values over 255)."""
  with open_h5(path) as f:
    if key not in f or dataset not in f[key]:
      raise InputError(path, f"no dataset {key}/{dataset}")
    try:
      return label_values(f[key][dataset], path, key, dataset)
    except (OSError, TypeError, ValueError) as e:
      if isinstance(e, InputError):
        raise
      raise InputError(path, f"{key}: cannot read {dataset} ({e.__class__.__name__}: "
                       f"{e})") from None


def label_maps(g: h5py.Group) -> np.ndarray | None:
  """The maps a results group's pred labels come from, float32: member_flow
  (K, T, h, w, 2) of a labels-fused ensemble, else flow (T, h, w, 2), else None."""
  name = next((n for n in ("member_flow", "flow") if n in g), None)
  return None if name is None else np.asarray(g[name][...], np.float32)


def write_sequence(f: h5py.File, seq: Sequence, compression: str | None = "gzip") -> None:
  """Writes one sequence into an open file (replacing an existing group)."""
  if seq.key in f:
    del f[seq.key]
  g = f.require_group(seq.patient).create_group(seq.view)
  g.create_dataset("img", data=np.asarray(seq.img, np.float32), compression=compression)
  if seq.gt is not None:
    g.create_dataset("gt", data=np.asarray(seq.gt, np.uint8), compression=compression)
  for k, v in seq.attrs.items():
    g.attrs[k] = v


def set_root_attrs(f: h5py.File, size: int) -> None:
  f.attrs["format_version"] = FORMAT_VERSION
  f.attrs["size"] = int(size)


def write_dataset(f: h5py.File, key: str, name: str, data: np.ndarray,
                  compression: str | None = "gzip", attrs: dict[str, Any] | None = None
                  ) -> None:
  """Writes (replacing) an extra dataset `name` (e.g. "flow_true") into group `key`."""
  g = f.require_group(key)
  if name in g:
    del g[name]
  d = g.create_dataset(name, data=np.asarray(data), compression=compression)
  for k, v in (attrs or {}).items():
    d.attrs[k] = v


def read_dataset(path: str | os.PathLike, key: str, name: str) -> np.ndarray:
  """Reads an extra dataset `name` of group `key` (e.g. "flow_true": (T, H, W, 2) float32)."""
  with open_h5(path) as f:
    if key not in f or name not in f[key]:
      raise InputError(path, f"no dataset {key}/{name}")
    return np.asarray(f[key][name][...])
