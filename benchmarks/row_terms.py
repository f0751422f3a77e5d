r"""Each method of a registration_quality.py folder on chosen pairs: Dice, signed
area-EF error, folding and, for Echo-ODE rows, the fit's final loss terms.

  python benchmarks/row_terms.py --run=DIR [--patients=patient0249,patient0294]

For every `pred_*.h5` in DIR (one per method) and the pairs of DIR/pairs.h5
(all, or --patients), printed as a Markdown table of means: Dice at ES (endo =
label 1, epi = labels 1-2), the area-EF error with its sign (propagated minus
true, points; negative = the mask contracts too little), folding (% of
pixels, the file's folding_fraction), and the recorded unweighted loss terms
and total of Echo-ODE fits (each row's own weights).
"""
from __future__ import annotations

import glob
import os

import h5py
import numpy as np
from absl import app, flags

_RUN = flags.DEFINE_string("run", None, "A registration_quality.py output folder.",
                           required=True)
_PATIENTS = flags.DEFINE_list("patients", None, "Only these patients (default: all).")

TERMS = ("loss", "ncc", "sim", "smt", "jdet")


def dice(a: np.ndarray, b: np.ndarray, labels) -> float:
  a, b = np.isin(a, labels), np.isin(b, labels)
  return float(2 * np.sum(a & b) / max(np.sum(a) + np.sum(b), 1))


def area_ef(ed: np.ndarray, es: np.ndarray) -> float:
  """100 (1 - A_ES / A_ED) of the LV cavity (label 1), points."""
  return 100.0 * (1.0 - np.sum(es == 1) / max(np.sum(ed == 1), 1))


def row(pred_path: str, pairs: h5py.File, keys: list[str]) -> dict[str, float]:
  vals: dict[str, list[float]] = {}
  with h5py.File(pred_path, "r") as f:
    for key in keys:
      patient, view = key.split("/")
      if patient not in f or view not in f[patient]:
        continue
      g, gt = f[patient][view], pairs[patient][view]["gt"]
      pred = g["pred"]
      got = {"dice_endo": dice(pred[1], gt[1], [1]), "dice_epi": dice(pred[1], gt[1], [1, 2]),
             "ef_signed": area_ef(pred[0], pred[1]) - area_ef(gt[0], gt[1])}
      if "folding_fraction" in g.attrs:
        got["fold_pct"] = 100.0 * float(g.attrs["folding_fraction"])
      got.update({t: float(g.attrs[f"loss_{t}"]) for t in TERMS if f"loss_{t}" in g.attrs})
      for k, v in got.items():
        vals.setdefault(k, []).append(v)
  return {k: float(np.mean(v)) for k, v in vals.items()} | {"n": len(vals.get("dice_endo", []))}


def main(argv):
  del argv
  run = _RUN.value
  with h5py.File(os.path.join(run, "pairs.h5"), "r") as pairs:
    keys = sorted(f"{p}/{v}" for p in pairs for v in pairs[p])
    if _PATIENTS.value:
      keys = [k for k in keys if k.split("/")[0] in set(_PATIENTS.value)]
    cols = ("dice_endo", "dice_epi", "ef_signed", "fold_pct") + TERMS
    print("| method file | n | " + " | ".join(cols) + " |")
    print("|---|" + ":-:|" * (len(cols) + 1))
    for path in sorted(glob.glob(os.path.join(run, "pred_*.h5"))):
      r = row(path, pairs, keys)
      cells = [f"{r[c]:.4g}" if c in r else "-" for c in cols]
      print(f"| {os.path.basename(path)} | {r['n']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
