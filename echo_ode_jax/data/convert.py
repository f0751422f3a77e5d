"""CAMUS -> the project's HDF5 layout (see hdf5.py and resample.py).

Per view: frames ED -> ES, resampled onto size x size isotropic pixels keeping
the physical aspect ratio (zero padding), images bilinear in [0, 1], labels
nearest neighbour (255 = frame not annotated). The view attributes hold
voxelspacing (mm per stored pixel, isotropic), ed_index / es_index (0-based
in the file: 0 and T-1), source_shape, source_voxelspacing, the resampling
(resample_scale, resample_offset, content_shape, pad, stored_shape; see
:func:`~echo_ode_jax.data.resample.to_source`), source_kind, source_folder (the
patient folder read), and every Info cfg field with lower-case keys (so the
cfg's 1-based ED / ES stay as `ed` / `es`).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence as Seq

import h5py
import numpy as np
from absl import logging

from echo_ode_jax import _atomic
from echo_ode_jax._progress import Progress
from echo_ode_jax.data import camus
from echo_ode_jax.data.hdf5 import (Sequence, attr_value, is_reserved_attr, set_root_attrs,
                                    write_sequence)
from echo_ode_jax.data.resample import Resampling, from_source, resample_image
from echo_ode_jax.errors import InputError

DEFAULT_SIZE = 256


def _source_folder(v: camus.CamusView) -> str:
  """The resolved patient folder a view was read from."""
  return str(Path(v.files[0]).resolve().parent) if v.files else ""


def to_sequence(v: camus.CamusView, size: int = DEFAULT_SIZE) -> Sequence:
  """Resamples one source view into the stored layout (a :class:`Sequence`).

  Raises InputError naming the cfg when one of its keys is an attribute or
  dataset name the project sets itself (hdf5.RESERVED_VIEW_ATTRS).
  """
  reserved = sorted(k for k in v.info if is_reserved_attr(k))
  if reserved:
    cfg = next((f for f in v.files if f.endswith(".cfg")), f"Info_{v.view}.cfg")
    raise InputError(cfg, f"key(s) {', '.join(reserved)} would overwrite attributes or "
                     "datasets the project sets itself; rename them")
  res = Resampling.fit(v.img.shape[1:], v.spacing, size)
  img = np.clip(resample_image(camus.normalise_intensity(v.img), res), 0.0, 1.0)
  gt = None if v.gt is None else from_source(v.gt, res)
  attrs = dict(v.info)
  attrs.update(res.attrs())
  attrs.update({
      "voxelspacing": np.array([res.spacing, res.spacing]),
      "source_voxelspacing": np.array(v.spacing, np.float64),
      "ed_index": 0,
      "es_index": v.num_frames - 1,
      "source_kind": v.kind,
      "source_folder": _source_folder(v),
  })
  return Sequence(v.patient, v.view, img.astype(np.float32), gt, attrs)


@dataclasses.dataclass
class ConvertReport:
  converted: list[str] = dataclasses.field(default_factory=list)     # "<patient>/<view>"
  existing: list[str] = dataclasses.field(default_factory=list)      # already in the output
  missing: list[str] = dataclasses.field(default_factory=list)       # views absent in the source
  bad: dict[str, str] = dataclasses.field(default_factory=dict)      # patient -> error


def _select(found: list[Path], patients: Seq[str] | None, root) -> list[Path]:
  if not patients:
    return found
  by_name = {p.name: p for p in found}
  out = []
  for name in patients:
    name = name.strip()
    key = name if name.startswith("patient") else f"patient{int(name):04d}" \
        if name.isdigit() else name
    if key not in by_name:
      raise InputError(root, f"requested patient {name!r} not found")
    out.append(by_name[key])
  return out


def convert_camus(camus_dir: str | os.PathLike, out: str | os.PathLike,
                  size: int = DEFAULT_SIZE, views: Seq[str] | None = None,
                  patients: Seq[str] | None = None, skip_bad: bool = False,
                  commit_every_s: float = 60.0) -> ConvertReport:
  """Converts CAMUS patient folders into the HDF5 layout at `out`, resumably.

  Args:
    camus_dir: database_nifti/, training/ or testing/, a folder of patient
      folders, or their parent (see :func:`camus.find_patients`).
    out: the HDF5 file. If it exists, groups already there are kept and only
      missing patient/views are added (so re-running is idempotent); a group
      converted from another patient folder is an error, not kept silently.
    size: stored image side in pixels.
    views: views to convert. None means all of camus.VIEWS, silently skipping
      views a patient lacks; an explicit list makes a view that is missing for
      every patient an error.
    patients: patient names (patient0001 or 1) to convert; default all.
    skip_bad: log and skip a patient with bad input instead of failing.
    commit_every_s: `out` is replaced atomically (temp file, then rename) after
      about this many seconds of conversion, and at the end; a patient is in
      it whole or not at all.

  Returns the report. Raises InputError on bad input (without `skip_bad`), or
  when another process is converting into `out`; OutputError when `out` cannot
  be written (a full disk, a read-only folder). The patients committed before
  stay in `out`, and a rerun converts only the rest; it first removes the
  temporary files a killed run left beside `out`.
  """
  if size < 8:
    raise InputError(None, f"--size must be >= 8, got {size}")
  if os.path.isdir(out):
    raise InputError(out, "is a directory; --out must name an HDF5 file")
  explicit = views is not None
  views = tuple(camus.VIEWS if views is None else views)
  for v in views:
    if v not in camus.VIEWS:
      raise InputError(camus_dir, f"unknown view {v!r}; choose from {camus.VIEWS}")
  folders = _select(camus.find_patients(camus_dir), patients, camus_dir)
  if explicit:   # checked before converting anything (a listing per patient)
    present: set[str] = set()
    for d in folders:
      try:
        present.update(camus.available_views(d))
      except InputError:
        if not skip_bad:   # with skip_bad, the patient is reported bad when converted
          raise
    absent = [v for v in views if v not in present]
    if absent:
      raise InputError(camus_dir, f"view(s) {', '.join(absent)} missing for all "
                       f"{len(folders)} patients")
  report = ConvertReport()
  out = Path(out)
  prog = Progress(len(folders), "convert", "patient")
  todo = list(folders)
  with _atomic.exclusive(out, "converting into"):
    for p in _atomic.remove_stale_temporaries(out):
      logging.warning("removed %s, a temporary file left by an interrupted run", p)
    if out.exists():
      _check_existing(out, size)
    while True:
      # One atomic commit per commit_every_s of work: an interrupted or failed
      # run keeps the patients of the commits before, and a rerun adds the rest.
      with _atomic.atomic_h5(out, "a" if out.exists() else "w", copy_existing=True) as f:
        set_root_attrs(f, size)
        t0 = time.monotonic()
        while todo:   # at least one patient per commit
          _convert_patient(f, out, todo.pop(0), views, size, skip_bad, report, prog)
          _atomic.check_writes(f)      # a full disk stops the run here
          if time.monotonic() - t0 >= commit_every_s:
            break
      if not todo:
        break
  logging.info("converted %d views, kept %d existing, %d missing views, %d bad patients",
               len(report.converted), len(report.existing), len(report.missing),
               len(report.bad))
  if report.bad:
    logging.warning("bad patients skipped:\n%s",
                    "\n".join(f"  {e}" for e in report.bad.values()))
  return report


def _check_existing(out: Path, size: int) -> None:
  """An existing output must be a readable HDF5 file of the same size."""
  try:
    with h5py.File(out, "r") as f:
      have = int(f.attrs["size"]) if "size" in f.attrs else None
  except OSError as e:
    raise InputError(out, f"existing output is not a readable HDF5 file ({e}); move it "
                     "aside or delete it, or choose another --out") from None
  if have is not None and have != size:
    raise InputError(out, f"existing output has size {have}, not the requested {size}")


def _convert_patient(f: h5py.File, out: Path, d: Path, views, size: int, skip_bad: bool,
                     report: "ConvertReport", prog: Progress) -> None:
  """Writes patient folder d's views into the open file f (all or none of them).

  A view already in f is kept, unless it was converted from another folder
  (InputError: a rerun must not mix two sources under one patient name).
  """
  here = str(d.resolve())
  for v in views:
    key = f"{d.name}/{v}"
    if key in f and "source_folder" in f[key].attrs:
      old = attr_value(f[key].attrs["source_folder"])
      if old != here:
        raise InputError(out, f"{key} was converted from {old}, not {here}; write to "
                         "another --out, or delete this one to convert again")
  try:
    seqs = []
    for v in views:
      key = f"{d.name}/{v}"
      if key in f:
        report.existing.append(key)
        continue
      cv = camus.read_view(d, v)
      if cv is None:
        report.missing.append(key)
        logging.info("%s: no %s view, skipped", d, v)
        continue
      seqs.append(to_sequence(cv, size))
  except InputError as e:
    if not skip_bad:
      raise
    report.bad[d.name] = str(e)
    logging.warning("skipping %s: %s", d.name, e)
    prog.update(1)
    return
  for s in seqs:  # write a patient only when all its views are good
    write_sequence(f, s)
    report.converted.append(s.key)
  prog.update(1, extra=f"{d.name}")
