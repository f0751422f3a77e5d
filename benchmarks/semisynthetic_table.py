r"""Table I on semi-synthetic full-cycle sequences (ground truth on every frame).

  python experiments/make_semisynthetic.py --camus_dir=CAMUS/database_nifti \
      --splits=CAMUS/splits.json --split=valid --size=128 --out=semi_valid.h5
  python benchmarks/semisynthetic_table.py --data=semi_valid.h5 --out=DIR \
      [--size=N] [--config.steps=1000] [--num=N] [--config.lambda_ncc=0] [--ants] [--quick]

Rows, each scored with every Table I column (consecutive-frame HD, temporal
inconsistencies, Dice endo / epi / mDice over all frames, EF MAE) plus folding:

  ground truth                the true masks themselves (the HD and temporal
                              references)
  copy m_0                    the ED mask on every frame
  U-Net (2D)                  the committed segmenter on every frame
  Echo-ODE (U-Net)            m_0 and the ES guide from the U-Net (the paper's setting)
  Echo-ODE (gt m_0, no guide) the true ED mask, image similarity only
  Echo-ODE (U-Net m_0, no guide) the U-Net's ED mask, image similarity only
  ..., bidirectional          a fit's saved flow, with the ES mask carried back
                              too and mixed in time (fit.propagate_labels; no
                              refit): the U-Net's ED and ES masks, or the true
                              ED and ES masks (a user with both annotated)
  ..., consensus              a fit's saved flow fusing the U-Net's masks of
                              every frame (fit.consensus_labels; no refit)
  ANTs SyNCC per frame        (--ants) ED registered to each frame
                              independently, the true ED mask pulled through

Stages are resumable (fits through fit_file's resume, ANTs per sequence, the
evaluations cached). DIR/table.md, summary.json and metrics.csv hold the
results; table.md and summary.json also compare, sequence by sequence, each
Echo-ODE row from the U-Net's m_0 with the U-Net per frame and each row from the
true m_0 with ANTs per frame (mean difference, 95% t interval, Wilcoxon p).
--quick is --size=64 --config.steps=300 --num=12 (flags given explicitly win). --num keeps the first N sequences (copied to DIR/data.h5).
--config.KEY=VALUE sets any FitConfig field (echo_ode_jax/overrides.py).
"""
from __future__ import annotations

import json
import math
import os
import sys

import h5py
import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _ants  # noqa: E402
import _quick  # noqa: E402
from echo_ode_jax import cli, metrics, overrides, reports, runner, tables  # noqa: E402
from echo_ode_jax import fit as fit_lib  # noqa: E402
from echo_ode_jax._atomic import atomic_path  # noqa: E402
from echo_ode_jax._progress import Progress  # noqa: E402
from echo_ode_jax.data import hdf5  # noqa: E402

_DATA = flags.DEFINE_string("data", None, "Semi-synthetic HDF5 (make_semisynthetic.py).",
                            required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_SIZE = flags.DEFINE_integer("size", None, "Fit / registration grid (default: the data's).")
_NUM = flags.DEFINE_integer("num", None, "Only the first N sequences.")
_CONFIG = overrides.define_config_flag()
_CHECKPOINTS = flags.DEFINE_string("checkpoints", "experiments/checkpoints",
                                   "Folder with the segmenter's workdir.")
_SEGMENTER = flags.DEFINE_string("segmenter", "unet", "Segmenter (workdir name).")
_ANTS = flags.DEFINE_boolean("ants", False, "Add ANTs SyNCC registered to each frame.")
_ANTS_TRANSFORM = flags.DEFINE_string("ants_transform", "SyNCC", "ants type_of_transform.")
_BATCH = flags.DEFINE_integer("batch_size", 12, "Echo-ODE sequences per compiled batch.")
_QUICK = _quick.define_flag()



def subset(data: str, num: int | None, path: str) -> str:
  """`data`, or its first `num` sequences copied to `path`."""
  keys = hdf5.list_keys(data)
  if not num or num >= len(keys):
    return data
  keys = keys[:num]
  if os.path.exists(path) and hdf5.list_keys(path) == keys:
    return path
  with atomic_path(path) as tmp, h5py.File(tmp, "w") as f, h5py.File(data, "r") as src:
    for k, v in src.attrs.items():
      f.attrs[k] = v
    for k in keys:
      patient, view = k.split("/")
      src.copy(src[k], f.require_group(patient), name=view)
  return path


def ants_per_frame(data: str, path: str, transform: str, size: int | None) -> str:
  """ANTs `transform` from frame 0 to every frame at size x size, the gt ED
  mask pulled through each on the data grid; resumable per sequence; writes
  attrs seconds and
  folding_fraction (mean over frames)."""
  _ants.import_ants()
  keys = hdf5.list_keys(data)
  done = set(hdf5.list_keys(path)) if os.path.exists(path) else set()
  todo = [k for k in keys if k not in done]
  prog = Progress(len(todo), f"ANTs {transform} per frame", "sequence")
  for k in todo:
    seq = hdf5.read_sequence(data, k)
    img = runner.resize(seq.img, (size, size), 1) if size else seq.img
    pred, folds, secs = [seq.gt[0]], [], 0.0
    for t in range(1, img.shape[0]):
      lab, fold, s = _ants.register_labels(img[t], img[0], seq.gt[0], transform,
                                           fixed_full=seq.img[t])
      pred.append(lab)
      folds.append(fold)
      secs += s
    with atomic_path(path, copy_existing=True) as tmp, h5py.File(tmp, "a") as f:
      g = f.require_group(k)
      g.create_dataset("pred", data=np.stack(pred).astype(np.uint8), compression="gzip")
      g.attrs.update({"status": "ok", "seconds": secs,
                      "folding_fraction": float(np.mean(folds))})
    prog.update(1)
  return path


def relabel_file(fit_h5: str, labels_h5: str, path: str, propagation: str) -> str:
  """Labels of every sequence from the flow saved in `fit_h5` (frames ED..ES)
  and the pred of `labels_h5`, without refitting (fit.labels_from_maps:
  "bidirectional" from its ED (frame 0) and ES (the flow's last frame) masks,
  "consensus" from its masks of frames ED..ES). The fit's flow and attrs are
  kept."""
  if os.path.exists(path):
    return path
  with atomic_path(path) as tmp, h5py.File(tmp, "w") as f, h5py.File(
      fit_h5, "r") as fit_f, h5py.File(labels_h5, "r") as lab_f:
    f.attrs["format_version"] = hdf5.FORMAT_VERSION
    for k in hdf5.list_keys(fit_h5):
      src = fit_f[k]
      if "flow" not in src:
        raise ValueError(f"{fit_h5}: {k} has no saved flow (fit with save_flow=True)")
      flow = src["flow"][()]
      labels = lab_f[k]["pred"][:flow.shape[0]]
      pred = fit_lib.labels_from_maps(propagation, hdf5.label_maps(src), labels[0],
                                      labels[-1], labels)
      g = f.require_group(k)
      g.create_dataset("pred", data=pred.astype(np.uint8), compression="gzip")
      g.create_dataset("flow", data=flow, compression="gzip")   # scored for folding
      g.attrs.update(dict(src.attrs))
  return path


PAIRED = (("mdice", "mDice", False, 3), ("dice_endo", "Dice endo", False, 3),
          ("ef_area_err", "EF error area (points)", True, 1))


def paired_references(names, seg_name: str, ants_name: str | None) -> dict[str, str]:
  """Which method each Echo-ODE row is compared with, sequence by sequence: a
  row from the segmenter's m_0 with the segmenter per frame, a row from the
  ground truth with ANTs per frame (when it ran)."""
  refs = {}
  for n in names:
    if n.startswith("Echo-ODE") and "gt " not in n:
      refs[n] = seg_name
    elif n.startswith("Echo-ODE") and ants_name:
      refs[n] = ants_name
  return refs


def _num(v, d=3):
  return f"{v:.{d}f}" if v is not None and math.isfinite(v) else "–"


def table_markdown(summaries: dict, folds: dict) -> str:
  head = ("| Method | mDice | Dice endo | Dice epi | consecutive-frame HD (mm) | "
          "Temp. Error | EF MAE area (%) | folding (%) | Failed |")
  lines = [head, "|---|" + ":-:|" * 8]
  for name, s in summaries.items():
    fold = folds.get(name, s.get("fold_frac_mean"))
    lines.append(
        f"| {name} | {_num(s['mdice'])} | {_num(s['dice_endo'])} | {_num(s['dice_epi'])} | "
        f"{_num(s['hd_mean'], 2)} ± {_num(s['hd_sd'], 2)} | "
        f"{s['temporal_errors']} / {s['n_ok']} | "
        f"{_num(s['ef_area_mae'], 1)} ± {_num(s['ef_area_sd'], 1)} | "
        f"{_num(100 * fold if fold is not None else math.nan, 3)} | "
        f"{s['n_failed'] + s['n_missing']} / {s['n_sequences']} |")
  return "\n".join(lines) + "\n"


def _mean_attr(path: str, name: str) -> float:
  vals = []
  with h5py.File(path, "r") as f:
    for k in hdf5.list_keys(path):
      if name in f[k].attrs:
        vals.append(float(f[k].attrs[name]))
  return float(np.mean(vals)) if vals else math.nan


def main(argv):
  del argv
  _quick.apply_flags(_QUICK)
  if _ANTS.value:
    _ants.import_ants()
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  data = subset(_DATA.value, _NUM.value, os.path.join(out, "data.h5"))
  size = _SIZE.value
  cfg = _quick.fit_config(_QUICK, _CONFIG)
  if cfg.propagation != "forward":
    raise app.UsageError("--config.propagation: the table fits forward and adds the "
                         "bidirectional and consensus rows from the saved flows itself")
  seg = _SEGMENTER.value
  digest = overrides.config_digest(cfg)   # fits of other settings go to other files
  preds = {
      "ground truth": tables.label_file(data, os.path.join(out, "pred_gt.h5")),
      "copy m_0": tables.label_file(data, os.path.join(out, "pred_copy.h5"),
                                    lambda g: np.repeat(g[:1], g.shape[0], 0)),
  }
  seg_name = tables.segmenter_label(seg)
  preds[seg_name] = tables.predict_stage(data, _CHECKPOINTS.value, seg,
                                             os.path.join(out, f"pred_{seg}.h5"))
  preds[tables.echo_ode_label(seg)] = tables.fit_stage(
      data, os.path.join(out, f"echo_{seg}_{size or 'data'}_{digest}.h5"), cfg, "segmenter", "segmenter",
      preds[seg_name], _BATCH.value, size, save_flow=True)
  preds["Echo-ODE (gt m_0, no guide)"] = tables.fit_stage(
      data, os.path.join(out, f"echo_gt_noguide_{size or 'data'}_{digest}.h5"), cfg, "gt", "none", None, _BATCH.value,
      size, save_flow=True)
  preds["Echo-ODE (U-Net m_0, no guide)"] = tables.fit_stage(
      data, os.path.join(out, f"echo_{seg}_noguide_{size or 'data'}_{digest}.h5"), cfg,
      "segmenter", "none", preds[seg_name], _BATCH.value, size, save_flow=True)
  # Other propagations of the same fits (no refit).
  for fit_name, labels, prop, name in (
      (tables.echo_ode_label(seg), seg_name, "bidirectional", None),
      (tables.echo_ode_label(seg), seg_name, "consensus", None),
      ("Echo-ODE (U-Net m_0, no guide)", seg_name, "consensus", None),
      ("Echo-ODE (gt m_0, no guide)", "ground truth", "bidirectional",
       "Echo-ODE (gt ED + ES masks), bidirectional")):
    preds[name or f"{fit_name}, {prop}"] = relabel_file(
        preds[fit_name], preds[labels], preds[fit_name][:-3] + f"_{prop}.h5", prop)
  folds = {}
  ants_name = None
  if _ANTS.value:
    ants_name = f"ANTs {_ANTS_TRANSFORM.value} per frame"
    path = os.path.join(out, f"pred_ants_{_ANTS_TRANSFORM.value}_{size or 'data'}.h5")
    preds[ants_name] = ants_per_frame(data, path, _ANTS_TRANSFORM.value, size)
    folds[ants_name] = _mean_attr(preds[ants_name], "folding_fraction")
  results = {n: reports.evaluate_cached(data, p, p[:-3] + ".eval.json")
             for n, p in preds.items()}
  summaries = {n: metrics.summarize(r) for n, r in results.items()}
  refs = paired_references(preds, seg_name, ants_name)
  diffs = {n: (ref, metrics.compare_rows(results[n], results[ref], [c[0] for c in PAIRED]))
           for n, ref in refs.items()}
  table = (f"{len(hdf5.list_keys(data))} semi-synthetic sequences; grid "
           f"{size or 'of the data'}; Echo-ODE {cfg.steps} steps, config "
           f"{overrides.config_label(_CONFIG)}\n\n" + table_markdown(summaries, folds)
           + "\nPaired, sequence by sequence: mean difference [95% t interval], Wilcoxon "
           "signed-rank p; lower EF error is better.\n\n"
           + metrics.paired_markdown(diffs, PAIRED))
  extra = {n: {"pred": os.path.relpath(p, out)} for n, p in preds.items()}
  for n in preds:
    if n.startswith("Echo-ODE"):
      extra[n]["config"] = json.loads(cfg.to_json())
    if n in diffs:
      extra[n]["paired"] = {"reference": diffs[n][0], **diffs[n][1]}
  reports.write_report(out, results, extra, table)
  logging.info("report in %s", out)
  print(table, end="")


if __name__ == "__main__":
  cli.main(main, huge_pages=True)
