"""Tiny fake CAMUS patient folders (2023 NIfTI and 2019 MetaImage) written into tmp_path.

Arrays are given in the usual view (T, H, W) / (H, W), rows = depth; the
writers store them the way the official releases do: NIfTI as (x, y[, t]),
MetaImage through SimpleITK (which stores (t, y, x) arrays as x-fastest).
"""
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from echo_ode_jax.data import synthetic


def write_nifti(path: Path, arr: np.ndarray, spacing=(0.3, 0.3)) -> Path:
  """arr (H, W) or (T, H, W), rows = depth; spacing (row, col) mm."""
  data = arr.T if arr.ndim == 2 else arr.transpose(2, 1, 0)
  affine = np.diag([-spacing[1], -spacing[0], 1.0, 1.0])
  nib.save(nib.Nifti1Image(data, affine), str(path))
  return path


def write_mhd(path: Path, arr: np.ndarray, spacing=(0.3, 0.3)) -> Path:
  """arr (H, W) or (T, H, W), rows = depth; spacing (row, col) mm."""
  im = sitk.GetImageFromArray(arr)
  im.SetSpacing((spacing[1], spacing[0]) + ((1.0,) if arr.ndim == 3 else ()))
  sitk.WriteImage(im, str(path))
  return path


def write_cfg(path: Path, **fields) -> Path:
  path.write_text("".join(f"{k}: {v}\n" for k, v in fields.items()))
  return path


def heart(seed=0, h=32, w=32, frames=6):
  """(img uint8 (T, h, w), gt uint8 (T, h, w)) with the LV above the LA (stretched synthetic)."""
  size = max(h, w)
  seq, _ = synthetic.make_sequence(seed, size=size, num_frames=frames, ef=0.5)
  rows = (np.arange(h) * size) // h
  cols = (np.arange(w) * size) // w
  img = (seq.img[:, rows][:, :, cols] * 255).round().astype(np.uint8)
  return img, seq.gt[:, rows][:, :, cols]


def patient_2023(root: Path, pid: str, view="4CH", seed=0, h=32, w=48, frames=6,
                 spacing=(0.3, 0.3), half_gt=True, edes=True) -> Path:
  """2023 layout: half_sequence (+gt), ED/ES (+gt), Info cfg (ED=1, ES=frames)."""
  d = root / pid
  d.mkdir(parents=True, exist_ok=True)
  img, gt = heart(seed, h, w, frames)
  img[:, 0, 0] = 0     # never constant
  img[:, 0, 1] = 200
  p = lambda s: d / f"{pid}_{view}_{s}.nii.gz"
  write_nifti(p("half_sequence"), img, spacing)
  if half_gt:
    write_nifti(p("half_sequence_gt"), gt, spacing)
  if edes:
    for name, i in (("ED", 0), ("ES", frames - 1)):
      write_nifti(p(name), img[i], spacing)
      write_nifti(p(f"{name}_gt"), gt[i], spacing)
  write_cfg(d / f"Info_{view}.cfg", ED=1, ES=frames, NbFrame=frames, Sex="F", Age=62,
            ImageQuality="Good", EF=55, FrameRate=30)
  return d, img, gt


def patient_2019(root: Path, pid: str, view="2CH", seed=1, h=40, w=24, frames=8, ed=2, es=6,
                 spacing=(0.154, 0.308)) -> Path:
  """2019 layout: full sequence (frames beyond ES), ED/ES (+gt) .mhd, Info cfg."""
  d = root / pid
  d.mkdir(parents=True, exist_ok=True)
  img, gt = heart(seed, h, w, frames)
  img[:, 0, 0] = 0
  img[:, 0, 1] = 200
  p = lambda s: d / f"{pid}_{view}_{s}.mhd"
  write_mhd(p("sequence"), img, spacing)
  for name, i in (("ED", ed - 1), ("ES", es - 1)):
    write_mhd(p(name), img[i], spacing)
    write_mhd(p(f"{name}_gt"), gt[i], spacing)
  write_cfg(d / f"Info_{view}.cfg", ED=ed, ES=es, NbFrame=frames, Sex="M", Age=70,
            ImageQuality="Medium", LVedv=100.5, LVesv=50.2, LVef=50.0)
  return d, img, gt


def patient_edes(root: Path, pid: str, view="4CH", seed=2, h=32, w=40, spacing=(0.308, 0.308)):
  """ED/ES only (like the shared copy): NIfTI ED/ES images and masks, no cfg."""
  d = root / pid
  d.mkdir(parents=True, exist_ok=True)
  img, gt = heart(seed, h, w, 5)
  img[:, 0, 0] = 0
  img[:, 0, 1] = 200
  for name, i in (("ED", 0), ("ES", 4)):
    write_nifti(d / f"{pid}_{view}_{name}.nii.gz", img[i], spacing)
    write_nifti(d / f"{pid}_{view}_{name}_gt.nii.gz", gt[i], spacing)
  return d, img[[0, 4]], gt[[0, 4]]
