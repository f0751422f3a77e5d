"""ANTs (antspyx) as a registration peer: warp a label map from a moving to a fixed frame.

antspyx is a benchmark-only dependency, never one of the project's. Install it
in the benchmark virtual environment (beside the PyTorch peer)::

  python -m venv --system-site-packages .venv-bench
  .venv-bench/bin/pip install antspyx

and run the benchmarks with ``.venv-bench/bin/python``. Registration runs on
one ITK thread with a fixed seed, so results repeat.
"""
from __future__ import annotations

import os
import time

import numpy as np

TRANSFORMS = ("SyN", "SyNCC")


def import_ants():
  """The ants module, or SystemExit with one line saying how to install it."""
  os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
  try:
    import ants  # noqa: PLC0415
  except ImportError:
    raise SystemExit(
        "error: --ants needs antspyx, which is not importable here; install it in the "
        "benchmark environment (python -m venv --system-site-packages .venv-bench && "
        ".venv-bench/bin/pip install antspyx) and run with .venv-bench/bin/python") from None
  return ants


def _images(fixed, moving, full_shape):
  """ants images of fixed and moving on a small grid placed in full_shape's space."""
  ants = import_ants()
  h, w = fixed.shape
  sp = (full_shape[0] / h, full_shape[1] / w)
  origin = (0.5 * sp[0] - 0.5, 0.5 * sp[1] - 0.5)
  small = lambda a: ants.from_numpy(np.ascontiguousarray(a, np.float32), origin=origin,
                                    spacing=sp)
  return small(fixed), small(moving), small


def _cleanup(reg) -> None:
  for t in set(reg["fwdtransforms"]) | set(reg["invtransforms"]):
    if os.path.exists(t) and os.path.basename(t).startswith("tmp"):
      os.remove(t)


def register_map(fixed: np.ndarray, moving: np.ndarray, transform: str, seed: int = 0,
                 full_shape: tuple[int, int] | None = None, pad: int = 64) -> np.ndarray:
  """ANTs' map from `fixed`'s pixels to positions in `moving`, (h, w, 2) (row, col) pixels.

  The registration is the one of :func:`register_labels` (same grid placement,
  seed and thread count); the map is read by warping row and column index
  images through the forward transforms with a linear interpolator, which is
  exact for a linear function. The index images extend `pad` pixels beyond
  `moving`'s grid, so positions mapped outside it are kept, not zeroed.
  """
  ants = import_ants()
  h, w = fixed.shape
  f, m, _ = _images(fixed, moving, full_shape or (h, w))
  reg = ants.registration(fixed=f, moving=m, type_of_transform=transform, random_seed=seed)
  rows, cols = np.meshgrid(np.arange(-pad, h + pad, dtype=np.float32),
                           np.arange(-pad, w + pad, dtype=np.float32), indexing="ij")
  sp, origin = m.spacing, m.origin
  big = lambda a: ants.from_numpy(a, spacing=sp, origin=tuple(
      o - pad * s for o, s in zip(origin, sp)))
  phi = np.stack([ants.apply_transforms(fixed=f, moving=big(c), interpolator="linear",
                                        transformlist=reg["fwdtransforms"]).numpy()
                  for c in (rows, cols)], -1)
  _cleanup(reg)
  return phi.astype(np.float32)


def register_labels(fixed: np.ndarray, moving: np.ndarray, labels: np.ndarray,
                    transform: str, seed: int = 0, fixed_full: np.ndarray | None = None
                    ) -> tuple[np.ndarray, float, float]:
  """Registers `moving` onto `fixed` with ANTs and pulls `labels` through the map.

  Args:
    fixed, moving: (h, w) float images, the registration grid.
    labels: (H, W) integer labels on `moving`'s field of view, at any grid
      size; H x W may be finer than h x w (e.g. the data grid).
    transform: an ants.registration type_of_transform ("SyN", "SyNCC", ...).
    fixed_full: `fixed` on the labels' H x W grid (default: `fixed` itself,
      then labels must be h x w).

  The small grid is placed in the big grid's physical space (spacing H / h,
  pixel centres aligned), so the labels are warped on their own grid.

  Returns:
    (labels on the H x W grid of `fixed` (uint8), share of registration-grid
    pixels where the deformable part's Jacobian determinant is <= 0, seconds
    of registration).
  """
  ants = import_ants()
  big = fixed if fixed_full is None else fixed_full
  f, m, _ = _images(fixed, moving, big.shape)
  t0 = time.perf_counter()
  reg = ants.registration(fixed=f, moving=m, type_of_transform=transform, random_seed=seed)
  seconds = time.perf_counter() - t0
  f_big = ants.from_numpy(np.ascontiguousarray(big, np.float32))
  lab = ants.from_numpy(np.ascontiguousarray(labels, np.float32))
  warped = ants.apply_transforms(fixed=f_big, moving=lab, transformlist=reg["fwdtransforms"],
                                 interpolator="genericLabel")
  warps = [t for t in reg["fwdtransforms"] if t.endswith((".nii.gz", ".nii"))]
  fold = 0.0
  if warps:
    jac = ants.create_jacobian_determinant_image(f, warps[0], do_log=False).numpy()
    fold = float(np.mean(jac <= 0))
  _cleanup(reg)
  return np.rint(warped.numpy()).astype(np.uint8), fold, seconds
