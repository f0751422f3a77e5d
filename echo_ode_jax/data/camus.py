"""Readers for the official CAMUS layouts (2023 NIfTI and 2019 MetaImage).

A patient folder ``patientXXXX/`` holds, per view V in {2CH, 4CH}:

* 2023 release: ``patientXXXX_V_half_sequence.nii.gz`` (frames ED -> ES) and
  ``..._half_sequence_gt.nii.gz`` (masks on every frame), ``..._{ED,ES}.nii.gz``,
  ``..._{ED,ES}_gt.nii.gz`` and ``Info_V.cfg``.
* 2019 release: ``patientXXXX_V_sequence.mhd/.raw`` (the full sequence, possibly
  beyond ES), ``..._{ED,ES}.mhd``, ``..._{ED,ES}_gt.mhd`` and ``Info_V.cfg``.
* ED/ES only (e.g. a copy without videos): ``..._{ED,ES}[_gt]`` files and maybe
  no cfg. The sequence is then the two frames [ED, ES].

:func:`read_view` returns frames ED -> ES, (T, H, W) with rows = depth and the
apex at the top: NIfTI stores (x, y[, t]) and is transposed; SimpleITK already
gives (t, y, x). Frames without a mask (2019 sequences between ED and ES; a
2023 sequence without its _gt file) get the label 255. Labels: 0 background,
1 LV cavity, 2 myocardium, 3 left atrium. Every problem with the input raises
:class:`~echo_ode_jax.errors.InputError` naming the file.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from echo_ode_jax.data.hdf5 import UNANNOTATED
from echo_ode_jax.errors import InputError

VIEWS = ("4CH", "2CH")
PATIENT_RE = re.compile(r"^patient\d{4}$")
VALID_LABELS = (0, 1, 2, 3)
_NIFTI_EXT = (".nii.gz", ".nii")
_MHD_EXT = (".mhd",)


@dataclasses.dataclass
class CamusView:
  """One view of one patient at its source resolution, frames ED -> ES.

  img: (T, H, W) source intensities (rows = depth, apex at the top).
  gt: (T, H, W) uint8 labels (255 = frame not annotated) or None.
  spacing: (row, col) mm per source pixel.
  info: the Info cfg fields, lower-case keys (empty without a cfg).
  kind: "half_sequence" (2023), "sequence" (2019) or "ed_es".
  files: the files read, for messages.
  """
  patient: str
  view: str
  img: np.ndarray
  gt: np.ndarray | None
  spacing: tuple[float, float]
  info: dict[str, Any]
  kind: str
  files: list[str]

  @property
  def num_frames(self) -> int:
    return int(self.img.shape[0])


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def find_patients(camus_dir: str | os.PathLike) -> list[Path]:
  """Patient folders (``patientXXXX``) under `camus_dir`, sorted by name.

  `camus_dir` may be ``database_nifti/`` (2023), ``training/`` or ``testing/``
  (2019), any folder of patient folders, or a parent holding
  ``database_nifti/`` or ``training/`` / ``testing/``.
  """
  root = Path(camus_dir)
  if not root.exists():
    raise InputError(root, "directory does not exist")
  if not root.is_dir():
    raise InputError(root, "not a directory")

  def patients_in(d: Path) -> list[Path]:
    return [p for p in d.iterdir() if p.is_dir() and PATIENT_RE.match(p.name)]

  found = patients_in(root)
  if not found:
    for sub in ("database_nifti", "training", "testing"):
      if (root / sub).is_dir():
        found += patients_in(root / sub)
  if not found:
    what = "empty directory" if not any(root.iterdir()) else "no patient folders"
    raise InputError(root, f"{what}: expected patientXXXX/ folders (or database_nifti/, "
                     "training/, testing/ holding them)")
  names = [p.name for p in found]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise InputError(root, f"patient folders found twice: {', '.join(dup[:5])}")
  return sorted(found, key=lambda p: p.name)


def _find(folder: Path, stem: str, exts) -> Path | None:
  for e in exts:
    p = folder / (stem + e)
    if p.is_file():
      return p
  return None


def _view_file(folder: Path, view: str, suffix: str) -> Path | None:
  return _find(folder, f"{folder.name}_{view}_{suffix}", _NIFTI_EXT + _MHD_EXT)


def _folder_error(d: Path, e: OSError) -> InputError:
  return InputError(d, f"cannot read patient folder ({e.__class__.__name__}: "
                    f"{e.strerror or e})")


def available_views(patient_dir: str | os.PathLike) -> list[str]:
  """The views (of VIEWS) that have at least one image file in a patient folder."""
  d = Path(patient_dir)
  try:
    return [v for v in VIEWS
            if any(_view_file(d, v, s) for s in ("half_sequence", "sequence", "ED", "ES"))]
  except OSError as e:
    raise _folder_error(d, e) from None


def _mask_pair_check(d: Path, pid: str, view: str, ed_gt, es_gt) -> None:
  """Both ED and ES masks, or neither (an unannotated view): one of them alone
  is a missing file, not an unannotated frame."""
  if (ed_gt is None) != (es_gt is None):
    name, other, other_name = ("ED", es_gt, "ES") if ed_gt is None else ("ES", ed_gt, "ED")
    other = Path(other)
    raise InputError(d / other.name.replace(f"_{other_name}_gt", f"_{name}_gt"),
                     f"missing: {other.name} exists but no {name} mask")


def read_cfg(path: str | os.PathLike) -> dict[str, Any]:
  """Parses an Info cfg (``Key: value`` lines) into {lower-case key: int/float/str}."""
  path = Path(path)
  try:
    text = path.read_text(encoding="utf-8-sig", errors="strict")   # -sig: a BOM is not the key
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(path, f"cannot read cfg ({e.__class__.__name__}: {e})") from None
  out: dict[str, Any] = {}
  for n, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    if ":" not in line:
      raise InputError(path, f"line {n}: expected 'Key: value', got {line[:60]!r}")
    k, v = (s.strip() for s in line.split(":", 1))
    if not k:
      raise InputError(path, f"line {n}: empty key")
    if k.lower() in out:
      raise InputError(path, f"line {n}: {k} given twice")
    out[k.lower()] = _parse_value(v)
  return out


def _parse_value(v: str):
  for cast in (int, float):
    try:
      return cast(v)
    except ValueError:
      pass
  return v


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, tuple[float, float]]:
  """Reads a NIfTI (nibabel) or MetaImage (SimpleITK) file.

  Returns (array, spacing): array (H, W) or (T, H, W) with rows = depth (apex at
  the top); spacing (row, col) in mm. A trailing / leading singleton frame axis
  is dropped.
  """
  path = Path(path)
  name = path.name.lower()
  _check_readable(path)
  if name.endswith(_MHD_EXT):
    data_file = _mhd_data_file(path)
    if data_file is not None:
      _check_readable(data_file)
  try:
    if name.endswith(_NIFTI_EXT):
      im = nib.load(str(path))
      arr = np.asanyarray(im.dataobj)
      zooms = im.header.get_zooms()
      if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
      if arr.ndim == 2:
        arr = arr.T                              # (x, y) -> (y, x)
      elif arr.ndim == 3:
        arr = arr.transpose(2, 1, 0)             # (x, y, t) -> (t, y, x)
      # Shortest decimal of the float32 header value: 0.308, not 0.30799999833.
      spacing = (_f32(zooms[1]), _f32(zooms[0])) if len(zooms) >= 2 else None
    elif name.endswith(_MHD_EXT):
      im = sitk.ReadImage(str(path))
      arr = sitk.GetArrayFromImage(im)         # (t, y, x) / (y, x)
      sp = im.GetSpacing()
      if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
      spacing = (float(sp[1]), float(sp[0]))
    else:
      raise InputError(path, "unknown image format (expected .nii, .nii.gz or .mhd)")
  except InputError:
    raise
  except Exception as e:  # nibabel/SimpleITK/zlib raise many types on corrupt files
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    msg = lines[0] if lines else ""
    for line in lines:  # SimpleITK: keep the "... ERROR: <what>" line, without the prefix
      if "ERROR:" in line:
        msg = re.sub(r"^.*ERROR:\s*(\w+\(0x[0-9a-f]+\):\s*)?", "", line)
        break
    what = "image or its data file" if name.endswith(_MHD_EXT) else "image"
    raise InputError(path, f"cannot read {what}, truncated or corrupt? "
                     f"({e.__class__.__name__}: {msg[:200]})") from None
  if arr.ndim not in (2, 3):
    raise InputError(path, f"expected a 2D image or a 2D+t sequence, got shape {arr.shape}")
  if spacing is None or not all(np.isfinite(spacing)) or min(spacing) <= 0:
    raise InputError(path, f"bad pixel spacing {spacing}")
  return np.ascontiguousarray(arr), spacing


def _check_readable(path: Path) -> None:
  """InputError naming `path` when it cannot be opened (missing, permissions): such
  a file is unreadable, not "truncated or corrupt"."""
  try:
    with open(path, "rb"):
      pass
  except OSError as e:
    raise InputError(path, f"cannot open ({e.__class__.__name__}: {e.strerror or e})") from None


def _mhd_data_file(path: Path) -> Path | None:
  """The data file named by a MetaImage header's ElementDataFile (None if inline/unknown)."""
  try:
    with open(path, "rb") as fh:
      head = fh.read(1 << 16).decode("latin-1")
  except OSError:
    return None
  for line in head.splitlines():
    k, _, v = line.partition("=")
    if k.strip() == "ElementDataFile":
      v = v.strip()
      if v and v.upper() != "LOCAL" and not v.upper().startswith("LIST") and "%" not in v:
        return path.parent / v
  return None


def _f32(x) -> float:
  return float(str(np.float32(x)))


def _check_image(path: Path, arr: np.ndarray) -> None:
  if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
    raise InputError(path, f"image dtype {arr.dtype} is not real")
  if not np.all(np.isfinite(arr)):
    raise InputError(path, "image has non-finite values (NaN or inf)")
  if arr.min() == arr.max():
    raise InputError(path, f"image is constant ({arr.min()})")


def _check_labels(path: Path, m: np.ndarray) -> np.ndarray:
  if not (np.issubdtype(m.dtype, np.integer) or np.issubdtype(m.dtype, np.floating)):
    raise InputError(path, f"mask dtype {m.dtype} is not numeric")
  if np.issubdtype(m.dtype, np.floating):
    if not np.all(np.isfinite(m)) or np.any(m != np.round(m)):
      raise InputError(path, "mask has non-integer values")
  bad = np.setdiff1d(np.unique(m), VALID_LABELS)
  if bad.size:
    raise InputError(path, f"labels outside {{0, 1, 2, 3}}: {bad[:8].tolist()}")
  return m.astype(np.uint8)


def _frame_shape_check(ref_path: Path, ref: np.ndarray, path: Path, arr: np.ndarray,
                       what: str) -> None:
  if arr.shape[-2:] != ref.shape[-2:]:
    raise InputError(path, f"{what} shape {arr.shape[-2:]} differs from "
                     f"{ref_path.name} shape {ref.shape[-2:]}")


def _spacing_check(ref_path: Path, ref_sp, path: Path, sp) -> None:
  if not np.allclose(ref_sp, sp, rtol=1e-3):
    raise InputError(path, f"pixel spacing {sp} differs from {ref_path.name} spacing {ref_sp}")


# ---------------------------------------------------------------------------
# One view
# ---------------------------------------------------------------------------


def _ed_es(cfg_path: Path, info: dict) -> tuple[int, int]:
  missing = [k.upper() for k in ("ed", "es") if k not in info]
  if missing:
    raise InputError(cfg_path, f"cfg lacks {' and '.join(missing)}")
  ed, es = info["ed"], info["es"]
  if not (isinstance(ed, int) and isinstance(es, int)):
    raise InputError(cfg_path, f"ED/ES must be integers, got ED={ed!r} ES={es!r}")
  if ed < 1 or es < 1:
    raise InputError(cfg_path, f"ED/ES are 1-based frame numbers, got ED={ed} ES={es}")
  if es <= ed:
    raise InputError(cfg_path, f"ES={es} is not after ED={ed}")
  nb = info.get("nbframe")
  if nb is not None:
    if not isinstance(nb, int) or nb < 1:
      raise InputError(cfg_path, f"NbFrame must be a positive integer, got {nb!r}")
    if es > nb:
      raise InputError(cfg_path, f"ES={es} exceeds NbFrame={nb}")
  return ed, es


def _read_mask(path: Path | None, ref_path: Path, ref: np.ndarray, frames: bool):
  if path is None:
    return None
  m, _ = read_image(path)
  if frames and m.ndim != 3:
    raise InputError(path, f"expected a mask sequence (T, H, W), got shape {m.shape}")
  if not frames and m.ndim != 2:
    raise InputError(path, f"expected a 2D mask, got shape {m.shape}")
  if m.shape != ref.shape:
    raise InputError(path, f"mask shape {m.shape} differs from image "
                     f"{ref_path.name} shape {ref.shape}")
  m = _check_labels(path, m)
  for t, frame in enumerate(m if m.ndim == 3 else m[None]):
    where = f"mask frame {t}" if m.ndim == 3 else "mask"
    if not frame.any():
      raise InputError(path, f"{where} is empty (all background)")
    if not (frame == 1).any():
      raise InputError(path, f"{where} has no LV cavity (label 1)")
  return m


def _read_frame(path: Path) -> tuple[np.ndarray, tuple[float, float]]:
  arr, sp = read_image(path)
  if arr.ndim != 2:
    raise InputError(path, f"expected a single 2D frame, got shape {arr.shape}")
  _check_image(path, arr)
  return arr, sp


def read_view(patient_dir: str | os.PathLike, view: str) -> CamusView | None:
  """Reads one view of a patient folder (frames ED -> ES); None if the view is absent.

  Prefers the 2023 half sequence, then the 2019 full sequence (sliced to
  [ED..ES] with the cfg), then the ED/ES frames. Raises InputError on bad input,
  an unreadable folder included.
  """
  d = Path(patient_dir)
  try:
    return _read_view(d, view)
  except OSError as e:
    raise _folder_error(d, e) from None


def _read_view(d: Path, view: str) -> CamusView | None:
  if not d.is_dir():
    raise InputError(d, "patient folder does not exist")
  pid = d.name
  f = lambda s: _view_file(d, view, s)
  half, seq = f("half_sequence"), f("sequence")
  ed_p, es_p = f("ED"), f("ES")
  ed_gt, es_gt = f("ED_gt"), f("ES_gt")
  cfg_path = d / f"Info_{view}.cfg"
  if not any((half, seq, ed_p, es_p)):
    return None
  info = read_cfg(cfg_path) if cfg_path.is_file() else {}
  files: list[str] = []

  if half is not None or seq is not None:
    src = half if half is not None else seq
    if not cfg_path.is_file():
      raise InputError(cfg_path, f"cfg missing (needed for the ED/ES frames of {src.name})")
    ed, es = _ed_es(cfg_path, info)
    arr, sp = read_image(src)
    if arr.ndim != 3:
      raise InputError(src, f"expected a sequence (T, H, W), got shape {arr.shape}")
    files += [str(src), str(cfg_path)]
    if half is not None:
      # The half sequence runs from ED to ES: it has ES - ED + 1 frames.
      if es - ed + 1 != arr.shape[0]:
        raise InputError(cfg_path, f"ED={ed}, ES={es} do not match the {arr.shape[0]} frames "
                         f"of {half.name} (expected ES - ED + 1 frames)")
      img = arr
      gt = _read_mask(f("half_sequence_gt"), src, arr, frames=True)
      kind = "half_sequence"
    else:
      if es > arr.shape[0]:
        raise InputError(cfg_path, f"ES={es} is outside the {arr.shape[0]} frames of {seq.name}")
      img = arr[ed - 1:es]
      gt = None
      kind = "sequence"
    _check_image(src, img)
    if gt is None and (ed_gt is not None or es_gt is not None):
      _mask_pair_check(d, pid, view, ed_gt, es_gt)
      # Masks only at ED and ES (2019; or a 2023 copy without the _gt sequence).
      gt = np.full(img.shape, UNANNOTATED, np.uint8)
      for i, p in ((0, ed_gt), (img.shape[0] - 1, es_gt)):
        m = _read_mask(p, src, img[0], frames=False)
        if m is not None:
          gt[i] = m
          files.append(str(p))
  else:
    for p, name in ((ed_p, "ED"), (es_p, "ES")):
      if p is None:
        other = ed_p if p is es_p else es_p
        raise InputError(d / f"{pid}_{view}_{name}.nii.gz",
                         f"missing: {other.name} exists but no {name} image "
                         "(and no sequence)")
    a_ed, sp = _read_frame(ed_p)
    a_es, sp_es = _read_frame(es_p)
    _frame_shape_check(ed_p, a_ed, es_p, a_es, "ES image")
    _spacing_check(ed_p, sp, es_p, sp_es)
    img = np.stack([a_ed, a_es])
    files += [str(ed_p), str(es_p)]
    _mask_pair_check(d, pid, view, ed_gt, es_gt)
    if ed_gt is None and es_gt is None:
      gt = None
    else:
      gt = np.full(img.shape, UNANNOTATED, np.uint8)
      for i, (p, ref_p, ref) in enumerate(((ed_gt, ed_p, a_ed), (es_gt, es_p, a_es))):
        m = _read_mask(p, ref_p, ref, frames=False)
        if m is not None:
          gt[i] = m
          files.append(str(p))
    if info:
      files.append(str(cfg_path))
      if "ed" in info or "es" in info:
        _ed_es(cfg_path, info)
    kind = "ed_es"
  return CamusView(pid, view, img, gt, sp, info, kind, files)


def normalise_intensity(img: np.ndarray) -> np.ndarray:
  """Source intensities -> float32 in [0, 1].

  Integer images with values in [0, 255] (CAMUS: uint8) are divided by 255;
  anything else is min-max scaled over the whole sequence.
  """
  if np.issubdtype(img.dtype, np.integer) and img.min() >= 0 and img.max() <= 255:
    return img.astype(np.float32) / 255.0
  x = img.astype(np.float64)
  lo, hi = x.min(), x.max()
  return ((x - lo) / (hi - lo)).astype(np.float32)
