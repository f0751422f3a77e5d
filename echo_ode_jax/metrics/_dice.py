"""Dice overlap of the LV structures on annotated frames."""
from __future__ import annotations

import numpy as np

UNANNOTATED = 255

#: Structure name -> labels it is made of (0 bg, 1 LV cavity, 2 myocardium, 3 LA).
LABEL_STRUCTURES = {"endo": (1,), "epi": (1, 2), "myo": (2,), "la": (3,)}
#: The structures scored by the evaluation (the LV ones of LABEL_STRUCTURES).
STRUCTURES = {k: LABEL_STRUCTURES[k] for k in ("endo", "epi", "myo")}


def structure_mask(labels: np.ndarray, structure: str) -> np.ndarray:
  """Boolean mask of a named structure ("endo", "epi", "myo"), same shape as `labels`."""
  return np.isin(labels, STRUCTURES[structure])


def dice(a: np.ndarray, b: np.ndarray) -> float:
  """Dice 2|A∩B| / (|A| + |B|) of two boolean masks; two empty masks give 1."""
  a = np.asarray(a, bool)
  b = np.asarray(b, bool)
  if a.shape != b.shape:
    raise ValueError(f"dice: shapes differ, {a.shape} vs {b.shape}")
  total = int(a.sum()) + int(b.sum())
  if total == 0:
    return 1.0
  return 2.0 * int(np.logical_and(a, b).sum()) / total


def annotated_frames(gt: np.ndarray) -> np.ndarray:
  """Indices of the frames of a (T, H, W) ground truth that carry an annotation.

  A frame is unannotated when all its pixels are 255 (any 255 pixel marks the
  frame, so partly filled frames are excluded too).
  """
  gt = np.asarray(gt)
  return np.flatnonzero(~np.any(gt.reshape(gt.shape[0], -1) == UNANNOTATED, axis=1))


def dice_per_frame(pred: np.ndarray, gt: np.ndarray, structure: str) -> np.ndarray:
  """(T,) Dice of one structure per frame; nan on unannotated frames.

  Args:
    pred: (T, H, W) predicted labels.
    gt: (T, H, W) ground-truth labels, 255 on unannotated frames.
    structure: "endo" (label 1), "epi" (labels 1 and 2) or "myo" (label 2).
  """
  pred, gt = np.asarray(pred), np.asarray(gt)
  if pred.shape != gt.shape or pred.ndim != 3:
    raise ValueError(f"dice_per_frame: need two (T, H, W) arrays, got {pred.shape}, {gt.shape}")
  out = np.full(pred.shape[0], np.nan)
  for t in annotated_frames(gt):
    out[t] = dice(structure_mask(pred[t], structure), structure_mask(gt[t], structure))
  return out


def dice_scores(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
  """Mean Dice over the annotated frames of one sequence.

  Returns:
    {"dice_endo", "dice_epi", "dice_myo", "mdice" (mean of endo and epi),
    "n_annotated"}; the Dice values are nan when no frame is annotated.
  """
  out: dict[str, float] = {}
  n = len(annotated_frames(gt))
  for s in STRUCTURES:
    per = dice_per_frame(pred, gt, s)
    out[f"dice_{s}"] = float(np.nanmean(per)) if n else float("nan")
  out["mdice"] = 0.5 * (out["dice_endo"] + out["dice_epi"])
  out["n_annotated"] = n
  return out
