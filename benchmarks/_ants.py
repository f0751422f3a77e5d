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


def register_labels(fixed: np.ndarray, moving: np.ndarray, labels: np.ndarray,
                    transform: str, seed: int = 0) -> tuple[np.ndarray, float, float]:
  """Registers `moving` onto `fixed` with ANTs and pulls `labels` through the map.

  Args:
    fixed, moving: (H, W) float images (pixel spacing 1).
    labels: (H, W) integer labels on `moving`'s grid.
    transform: an ants.registration type_of_transform ("SyN", "SyNCC", ...).

  Returns:
    (labels on `fixed`'s grid (H, W) uint8, share of pixels where the
    deformable part's Jacobian determinant is <= 0, seconds of registration).
  """
  ants = import_ants()
  f = ants.from_numpy(np.ascontiguousarray(fixed, np.float32))
  m = ants.from_numpy(np.ascontiguousarray(moving, np.float32))
  t0 = time.perf_counter()
  reg = ants.registration(fixed=f, moving=m, type_of_transform=transform, random_seed=seed)
  seconds = time.perf_counter() - t0
  lab = ants.from_numpy(np.ascontiguousarray(labels, np.float32))
  warped = ants.apply_transforms(fixed=f, moving=lab, transformlist=reg["fwdtransforms"],
                                 interpolator="genericLabel")
  warps = [t for t in reg["fwdtransforms"] if t.endswith((".nii.gz", ".nii"))]
  fold = 0.0
  if warps:
    jac = ants.create_jacobian_determinant_image(f, warps[0], do_log=False).numpy()
    fold = float(np.mean(jac <= 0))
  for t in set(reg["fwdtransforms"]) | set(reg["invtransforms"]):
    if os.path.exists(t) and os.path.basename(t).startswith("tmp"):
      os.remove(t)
  return np.rint(warped.numpy()).astype(np.uint8), fold, seconds
