r"""Each method of a registration_quality.py folder on chosen pairs: Dice, signed
area-EF error, folding and, for Echo-ODE rows, the fit's final loss terms.

  python benchmarks/row_terms.py --run=DIR [--patients=patient0249,patient0294]

For every `pred_*.h5` in DIR (one per method) and the pairs of DIR/pairs.h5
(all, or --patients), printed as a Markdown table of means: Dice at ES (endo =
label 1, epi = labels 1-2), the area-EF error with its sign (propagated minus
true, points; negative = the mask contracts too little), folding (% of
pixels, the file's folding_fraction), and the recorded unweighted loss terms
and total of Echo-ODE fits (each row's own weights), and last_stage_idle_pct:
the % of fits whose returned (lowest-loss) parameters are those the last stage
started from, i.e. whose last stage never lowered the loss. Failed fits (status other
than ok) are left out, as registration_quality.py leaves them out of its means.
"""
from __future__ import annotations

import functools
import glob
import json
import os

import h5py
import numpy as np
from absl import app, flags

from echo_ode_jax import fit, metrics
from echo_ode_jax.config import FitConfig

_RUN = flags.DEFINE_string("run", None, "A registration_quality.py output folder.",
                           required=True)
_PATIENTS = flags.DEFINE_list("patients", None, "Only these patients (default: all).")

TERMS = ("loss", "ncc", "sim", "smt", "jdet")


def signed_ef_error(pred: np.ndarray, gt: np.ndarray) -> float:
  """Area EF of pred (2, H, W) minus gt's, points (area ratios need no spacing)."""
  ef = lambda m: metrics.ef_measures(m[0], m[1], (1.0, 1.0))["ef_area"]
  return ef(pred) - ef(gt)


@functools.lru_cache(maxsize=None)
def last_stage_start(config: str) -> int:
  """The history step at which a fit of this saved FitConfig (JSON) starts its last stage."""
  return sum(c.steps for _, c in fit.pyramid(FitConfig.from_dict(json.loads(config)))[:-1])


def row(pred_path: str, pairs: h5py.File, keys: list[str]) -> dict[str, float]:
  vals: dict[str, list[float]] = {}
  with h5py.File(pred_path, "r") as f:
    for key in keys:
      patient, view = key.split("/")
      if patient not in f or view not in f[patient]:
        continue
      g, gt = f[patient][view], pairs[patient][view]["gt"][()]
      if g.attrs.get("status", "ok") != "ok":
        continue
      pred = g["pred"][()]
      got = {f"dice_{s}": metrics.dice(metrics.structure_mask(pred[1], s),
                                       metrics.structure_mask(gt[1], s)) for s in ("endo", "epi")}
      got["ef_signed"] = signed_ef_error(pred, gt)
      if "folding_fraction" in g.attrs:
        got["fold_pct"] = 100.0 * float(g.attrs["folding_fraction"])
      got.update({t: float(g.attrs[f"loss_{t}"]) for t in TERMS if f"loss_{t}" in g.attrs})
      if "config" in g.attrs and int(g.attrs.get("best_step", -1)) >= 0:
        got["last_stage_idle_pct"] = 100.0 * float(
            int(g.attrs["best_step"]) == last_stage_start(str(g.attrs["config"])))
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
    cols = ("dice_endo", "dice_epi", "ef_signed", "fold_pct") + TERMS + ("last_stage_idle_pct",)
    print("| method file | n | " + " | ".join(cols) + " |")
    print("|---|" + ":-:|" * (len(cols) + 1))
    for path in sorted(glob.glob(os.path.join(run, "pred_*.h5"))):
      r = row(path, pairs, keys)
      cells = [f"{r[c]:.4g}" if c in r else "-" for c in cols]
      print(f"| {os.path.basename(path)} | {r['n']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  app.run(main)
