r"""Registration quality on real ED/ES pairs: the ground-truth ED mask carried to ES.

  python benchmarks/registration_quality.py --data=DATA.h5 --out=DIR \
      [--splits=F --split=valid] [--num=N] [--size=128] [--config.steps=1000] \
      [--config.lambda_smt=0.01] [--grid="|lambda_ncc=0|pyramid_levels=3"] \
      [--segmentation=PRED.h5 | --segmenter=experiments/checkpoints/unet] [--ants]
  python benchmarks/registration_quality.py --data=DATA.h5 --out=DIR --quick ...

On the ED/ES pair of every sequence of DATA.h5 (a converted CAMUS file; all of
it, or the patients of one split), the ground-truth ED mask is propagated to ES
by each method, and scored against the ES ground truth:

  copy m_0     the ED mask itself (no motion)
  U-Net        a segmenter's own ES prediction (its ED prediction for the EF)
  Echo-ODE     `fit_sequences.py --init=gt --guide=none` on the 2-frame pair,
               one row per --grid row (--config.KEY=VALUE set the base)
  ANTs SyN, ANTs SyNCC  (--ants) antspyx registration of ED onto ES, the mask
               pulled through it with a label interpolator

Per patient and as means: Dice at ES (endo, epi), Hausdorff at ES (mm, endo and
epi), area-EF error (points, against the ground truth's), folding (% of pixels
with det D phi <= 0, Echo-ODE and ANTs) and seconds per pair (Echo-ODE: its
batch's wall time over the batch size, compilation included; ANTs: one ITK
thread). Every method's masks are on DATA.h5's grid: Echo-ODE and ANTs warp
the ED mask there through their --size maps. A "k HD inf" note counts ES
masks that lost a structure (left out of the HD means). Written to DIR:

  pairs.h5              the 2-frame (ED, ES) sequences fitted
  pred_<method>_<size>.h5  each method's masks (/<patient>/<view>/pred, (2, H, W),
                        on DATA.h5's grid whatever --size the fit ran at)
  results.csv           one row per (method, patient)
  table.md, summary.json  the means (+- sd) per method, and each Echo-ODE row
                        against --reference (ANTs SyNCC with --ants) patient by
                        patient: mean difference, its 95% t interval, Wilcoxon p
  worst.png             the 4 patients with the lowest Echo-ODE endo Dice: ED
                        with its mask, ES with the ground truth, each method at ES

Every stage is resumable: a rerun skips what is finished (Echo-ODE through
fit_file's resume, ANTs per patient). --quick is --size=64 --config.steps=300
--num=12 (flags given explicitly win). The registration and the segmenter run
at --size; the fit uses FitConfig's defaults plus the --config.KEY overrides
(grid keys are the same keys, echo_ode_jax/overrides.py).

ANTs (--ants) needs antspyx, a benchmark-only dependency (benchmarks/_ants.py
says how to install it); run the script with that environment's python.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import sys

import h5py
import numpy as np
import matplotlib.pyplot as plt
from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _ants  # noqa: E402
import _quick  # noqa: E402
from echo_ode_jax import cli, metrics, overrides, plots, reports, runner  # noqa: E402
from echo_ode_jax._atomic import atomic_path  # noqa: E402
from echo_ode_jax._progress import Progress  # noqa: E402
from echo_ode_jax.data import hdf5  # noqa: E402
from echo_ode_jax.errors import InputError  # noqa: E402
from echo_ode_jax.segmenters import predict, train  # noqa: E402

_DATA = flags.DEFINE_string("data", None, "Converted CAMUS HDF5 (gt at ED and ES).",
                            required=True)
_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_SPLITS = flags.DEFINE_string("splits", None, "JSON patient split {name: [patients]}.")
_SPLIT = flags.DEFINE_string("split", "valid", "Which list of --splits to use.")
_NUM = flags.DEFINE_integer("num", None, "Only the first N patients (sorted).")
_SIZE = flags.DEFINE_integer("size", 128, "Registration grid (size x size).")
_CONFIG = overrides.define_config_flag()
_GRID = flags.DEFINE_string("grid", "", "Echo-ODE rows: a grid over --config "
                            '("lambda_sim=1,10;lambda_smt=0.01,0.03"), or several grids '
                            'joined by "|" for their union ("|lambda_ncc=0|pyramid_levels=3": '
                            "the base, then two single changes); empty: the base only.")
_SEGMENTATION = flags.DEFINE_string("segmentation", None, "Per-frame predictions of DATA.h5 "
                                    "(PRED.h5); their ES frame is the segmenter row.")
_SEGMENTER = flags.DEFINE_string("segmenter", "experiments/checkpoints/unet",
                                 "Segmenter workdir run on the pairs when --segmentation is "
                                 "not given ('' for no segmenter row).")
_ANTS = flags.DEFINE_boolean("ants", False, "Add ANTs SyN and SyNCC rows (antspyx).")
_ANTS_TRANSFORMS = flags.DEFINE_list("ants_transforms", ["SyN", "SyNCC"],
                                     "ants.registration type_of_transform values.")
_BATCH = flags.DEFINE_integer("batch_size", 12, "Echo-ODE sequences per compiled batch.")
_QUICK = _quick.define_flag()
_WORST = flags.DEFINE_integer("worst", 4, "Patients in worst.png.")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "The method every Echo-ODE row is compared with, patient by "
    "patient (paired table); default: the last --ants_transforms row with --ants, "
    "else none.")

COLUMNS = ("dice_endo", "dice_epi", "hd_endo", "hd_epi", "ef_err", "fold_pct", "seconds")
PAIRED = (("dice_endo", "Dice endo", False, 3), ("dice_epi", "Dice epi", False, 3),
          ("ef_err", "area-EF error (points)", True, 1))


def select_keys(data: str, splits: str | None, split: str, num: int | None) -> list[str]:
  """Sequence keys of `data` whose patient is in `splits[split]` (all without
  --splits), sorted, the first `num`."""
  keys = hdf5.list_keys(data)
  if splits:
    try:
      with open(splits) as f:
        lists = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise InputError(splits, f"not a readable JSON split file ({e})") from None
    if split not in lists:
      raise InputError(splits, f"no split {split!r} (has {', '.join(sorted(lists))})")
    wanted = set(lists[split])
    keys = [k for k in keys if k.split("/")[0] in wanted]
  keys = sorted(keys)[:num] if num else sorted(keys)
  if not keys:
    raise InputError(data, "no sequence selected")
  return keys


def write_pairs(data: str, keys: list[str], path: str) -> list[str]:
  """Writes the (ED, ES) frames of `keys` as 2-frame sequences (project layout).

  Returns the keys written; an existing `path` with the same keys is kept.
  """
  if os.path.exists(path) and set(hdf5.list_keys(path)) == set(keys):
    return keys
  with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
    with h5py.File(data, "r") as src:
      for k, v in src.attrs.items():
        f.attrs[k] = v
    for k in keys:
      seq = hdf5.read_sequence(data, k)
      ed = int(seq.attrs.get("ed_index", 0))
      es = int(seq.attrs.get("es_index", seq.num_frames - 1))
      if seq.gt is None:
        raise InputError(data, f"{k}: no gt")
      gt = seq.gt[[ed, es]]
      if np.any(gt == hdf5.UNANNOTATED):
        raise InputError(data, f"{k}: ED or ES frame not annotated")
      attrs = dict(seq.attrs, ed_index=0, es_index=1, pair_source_frames=np.asarray([ed, es]))
      hdf5.write_sequence(f, hdf5.Sequence(seq.patient, seq.view, seq.img[[ed, es]], gt,
                                           attrs))
  return keys


def grid_rows(spec: str) -> list[dict]:
  """The union of the grids of `spec` ("|"-separated grids, `overrides.parse_grid`),
  in order, without repeats; an empty part is the base row."""
  rows = []
  for part in (spec or "").split("|"):
    for row in overrides.parse_grid(part):
      if row not in rows:
        rows.append(row)
  return rows


def row_file(out: str, row: dict, cfg, size: int) -> str:
  """The results file of an Echo-ODE row: pred_echo_<overrides>_<size>_<digest>.h5
  (`overrides.config_digest`: a FitConfig field added or removed at its default
  keeps the name), or an existing file of the same size and digest whose
  overrides were spelt otherwise; fit_file's resume check refuses a file of
  other settings."""
  digest = overrides.config_digest(cfg)
  path = os.path.join(out, f"pred_echo_{overrides.row_slug(row)}_{size}_{digest}.h5")
  same = sorted(glob.glob(os.path.join(glob.escape(out), f"pred_echo_*_{size}_{digest}.h5")))
  return path if os.path.exists(path) or not same else same[0]


def pair_scores(pred: np.ndarray, gt: np.ndarray, spacing) -> dict[str, float]:
  """Scores of a propagated pair. pred, gt: (2, H, W) labels (ED, ES)."""
  out = {}
  for s in ("endo", "epi"):
    p, g = metrics.structure_mask(pred[1], s), metrics.structure_mask(gt[1], s)
    out[f"dice_{s}"] = metrics.dice(p, g)
    out[f"hd_{s}"] = metrics.hausdorff_mm(p, g, spacing)
  ef = metrics.ef_measures(pred[0], pred[1], spacing)["ef_area"]
  gt_ef = metrics.ef_measures(gt[0], gt[1], spacing)["ef_area"]
  out["ef_area"], out["gt_ef_area"], out["ef_err"] = ef, gt_ef, abs(ef - gt_ef)
  return out


def _write_preds(path: str, preds: dict[str, np.ndarray], attrs: dict[str, dict]) -> None:
  """Adds /<key>/pred (and attrs) to `path`, atomically."""
  with atomic_path(path, copy_existing=True) as tmp, h5py.File(tmp, "a") as f:
    f.attrs["format_version"] = hdf5.FORMAT_VERSION
    for k, p in preds.items():
      if k in f:
        del f[k]
      g = f.require_group(k)
      g.create_dataset("pred", data=p.astype(np.uint8), compression="gzip")
      for a, v in attrs.get(k, {}).items():
        g.attrs[a] = v


def _done(path: str) -> set[str]:
  return set(hdf5.list_keys(path)) if os.path.exists(path) else set()


def copy_method(pairs: str, keys: list[str], path: str) -> None:
  todo = [k for k in keys if k not in _done(path)]
  if todo:
    _write_preds(path, {k: hdf5.read_sequence(pairs, k).gt[[0, 0]] for k in todo}, {})


def segmenter_method(pairs: str, keys: list[str], path: str, data: str,
                     segmentation: str | None, workdir: str, size: int) -> None:
  """The segmenter's own ED and ES masks: from --segmentation (at the source
  frames) or by running the `workdir` segmenter on the pair at `size`."""
  todo = [k for k in keys if k not in _done(path)]
  if not todo:
    return
  preds = {}
  if segmentation:
    for k in todo:
      frames = np.asarray(hdf5.read_sequence(pairs, k).attrs["pair_source_frames"])
      p = hdf5.read_labels(segmentation, k, "pred")
      preds[k] = p[frames]
  else:
    state = train.load_model_state(workdir)
    for k in todo:
      img = hdf5.read_sequence(pairs, k).img
      small = runner.resize(img, (size, size), 1)
      preds[k] = runner.resize(predict.predict_frames(state, small), img.shape[1:], 0)
  _write_preds(path, preds, {})


def ants_method(pairs: str, keys: list[str], path: str, transform: str, size: int) -> None:
  """ANTs `transform` of ED onto ES at size x size, the ED mask warped on the
  data grid; per-patient resumable."""
  _ants.import_ants()
  todo = [k for k in keys if k not in _done(path)]
  prog = Progress(len(todo), f"ANTs {transform}", "pair")
  for k in todo:
    seq = hdf5.read_sequence(pairs, k)
    img = runner.resize(seq.img, (size, size), 1)
    es, fold, secs = _ants.register_labels(img[1], img[0], seq.gt[0], transform,
                                           fixed_full=seq.img[1])
    _write_preds(path, {k: np.stack([seq.gt[0], es])},
                 {k: {"seconds": secs, "folding_fraction": fold, "status": "ok"}})
    prog.update(1)


def echo_ode_method(pairs: str, keys: list[str], path: str, cfg, size: int,
                    batch_size: int) -> None:
  """Echo-ODE from the gt ED mask with image similarity only (resumable)."""
  runner.fit_file(pairs, path, cfg, init="gt", guide="none", patients=keys,
                  batch_size=batch_size, size=size)


def score(pairs: str, keys: list[str], method: str, path: str) -> list[dict]:
  rows = []
  with h5py.File(path, "r") as f:
    for k in keys:
      seq = hdf5.read_sequence(pairs, k)
      spacing = tuple(float(s) for s in np.ravel(seq.attrs["voxelspacing"]))
      row = {"method": method, "key": k}
      if k not in f:
        rows.append({**row, "status": "missing"})
        continue
      attrs = {a: hdf5.attr_value(v) for a, v in f[k].attrs.items()}
      status = attrs.get("status", "ok")
      row.update(status=status, reason=attrs.get("reason", ""))
      if status == "ok":
        row.update(pair_scores(np.asarray(f[k]["pred"]), seq.gt, spacing))
      fold = attrs.get("folding_fraction")
      row["fold_pct"] = 100.0 * float(fold) if fold is not None else math.nan
      row["seconds"] = float(attrs.get("seconds", math.nan))
      rows.append(row)
  return rows


def summarize(rows: list[dict]) -> dict:
  ok = [r for r in rows if r.get("status") == "ok"]
  out = {"n": len(rows), "failed": len(rows) - len(ok),
         "hd_inf": sum(not math.isfinite(r.get(c, math.nan)) for r in ok
                       for c in ("hd_endo", "hd_epi"))}
  for c in COLUMNS:
    v = np.asarray([r.get(c, math.nan) for r in ok], np.float64)
    v = v[np.isfinite(v)]
    out[c] = (float(v.mean()), float(v.std())) if v.size else (math.nan, math.nan)
  return out


def table_markdown(summaries: dict[str, dict]) -> str:
  head = ("| method | Dice endo | Dice epi | HD endo (mm) | HD epi (mm) | area-EF error "
          "(points) | folding (%) | s / pair | failed |")
  lines = [head, "|---|" + ":-:|" * 8]
  for name, s in summaries.items():
    def cell(c, d=3, sd=False):
      m, v = s[c]
      if not math.isfinite(m):
        return "-"
      return f"{m:.{d}f} ± {v:.{d}f}" if sd else f"{m:.{d}f}"
    lines.append(f"| {name} | {cell('dice_endo')} | {cell('dice_epi')} | "
                 f"{cell('hd_endo', 1, True)} | {cell('hd_epi', 1, True)} | "
                 f"{cell('ef_err', 1, True)} | {cell('fold_pct', 3)} | {cell('seconds', 1)} | "
                 f"{s['failed']} / {s['n']} |")
  return "\n".join(lines) + "\n"


def worst_figure(pairs: str, preds: dict[str, str], rows: list[dict], ref: str,
                 num: int, path: str) -> str:
  """ED with its mask, ES with the gt, then each method at ES, for the `num`
  patients with the lowest endo Dice of method `ref`."""
  ref_rows = [r for r in rows if r["method"] == ref and r.get("status") == "ok"]
  worst = [r["key"] for r in sorted(ref_rows, key=lambda r: r["dice_endo"])[:num]]
  cols = ["ED (gt)", "ES (gt)"] + list(preds)
  fig, axes = plt.subplots(max(1, len(worst)), len(cols), squeeze=False,
                           figsize=(2.2 * len(cols), 2.2 * max(1, len(worst))))
  for i, k in enumerate(worst):
    seq = hdf5.read_sequence(pairs, k)
    panels = [(seq.img[0], seq.gt[0]), (seq.img[1], seq.gt[1])]
    for p in preds.values():
      with h5py.File(p, "r") as f:
        panels.append((seq.img[1], np.asarray(f[k]["pred"][1]) if k in f else None))
    for j, (im, lab) in enumerate(panels):
      ax = axes[i, j]
      ax.imshow(im, cmap="gray", vmin=0, vmax=1)
      if lab is not None:
        plots.draw_structures(ax, lab, lw=0.8)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(cols[j], fontsize=8)
      if j == 0:
        ax.set_ylabel(k.split("/")[0], fontsize=8)
  plots.structures_legend(fig)
  fig.tight_layout(rect=(0, 0.04, 1, 1))
  return plots.save(fig, path)


def slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in "._-" else "_" for c in name).strip("_")


def main(argv):
  del argv
  _quick.apply_flags(_QUICK)
  if _ANTS.value:
    _ants.import_ants()
  out, data, size = _OUT.value, _DATA.value, _SIZE.value
  os.makedirs(out, exist_ok=True)
  keys = select_keys(data, _SPLITS.value, _SPLIT.value, _NUM.value)
  pairs = os.path.join(out, "pairs.h5")
  write_pairs(data, keys, pairs)
  base = _quick.fit_config(_QUICK, _CONFIG)
  logging.info("%d ED/ES pairs, registration at %d^2, %d fit steps", len(keys), size,
               base.steps)
  # Every method's name, masks file and how to make it, planned before any work.
  plan: list[tuple[str, str, functools.partial]] = [
      ("copy m_0", os.path.join(out, "pred_copy.h5"), functools.partial(
          copy_method, pairs, keys))]
  extra: dict[str, dict] = {}
  if _SEGMENTATION.value or _SEGMENTER.value:
    name = "segmenter ES" if _SEGMENTATION.value else (
        f"{os.path.basename(os.path.normpath(_SEGMENTER.value))} ES")
    plan.append((name, os.path.join(out, f"pred_{slug(name)}" + (
        ".h5" if _SEGMENTATION.value else f"_{size}.h5")), functools.partial(
            segmenter_method, pairs, keys, data=data, segmentation=_SEGMENTATION.value,
            workdir=_SEGMENTER.value, size=size)))
  echo_names = []
  base_label = overrides.config_label(_CONFIG)
  base_file = overrides.config_file(_CONFIG)
  for row in grid_rows(_GRID.value):
    cfg = overrides.apply_overrides(base, row)
    name = " ".join(w for w in ("Echo-ODE", base_file, row and overrides.row_label(row)) if w)
    plan.append((name, row_file(out, row, cfg, size), functools.partial(
        echo_ode_method, pairs, keys, cfg=cfg, size=size, batch_size=_BATCH.value)))
    extra[name] = {"config": json.loads(cfg.to_json())}
    echo_names.append(name)
  if _ANTS.value:
    for t in _ANTS_TRANSFORMS.value:
      plan.append((f"ANTs {t}", os.path.join(out, f"pred_ants_{slug(t)}_{size}.h5"),
                   functools.partial(ants_method, pairs, keys, transform=t, size=size)))
  methods = {name: path for name, path, _ in plan}
  reference = _REFERENCE.value or (f"ANTs {_ANTS_TRANSFORMS.value[-1]}" if _ANTS.value
                                   and _ANTS_TRANSFORMS.value else None)
  if reference is not None and reference not in methods:
    raise InputError(None, f"--reference={reference}: no such method; the methods are "
                     f"{', '.join(methods)}")
  for name, path, make in plan:
    logging.info("%s -> %s", name, path)
    make(path)
  rows = [r for name, p in methods.items() for r in score(pairs, keys, name, p)]
  reports.write_csv(os.path.join(out, "results.csv"), rows)
  by_method = {n: [r for r in rows if r["method"] == n] for n in methods}
  summaries = {n: summarize(by_method[n]) for n in methods}
  table = table_markdown(summaries)
  diffs = {n: (reference, metrics.compare_rows(by_method[n], by_method[reference],
                                               [c[0] for c in PAIRED]))
           for n in echo_names} if reference else {}
  if diffs:
    table += ("\nPaired, patient by patient: mean difference [95% t interval], Wilcoxon "
              "signed-rank p; lower EF error is better.\n\n"
              + metrics.paired_markdown(diffs, PAIRED))
  with atomic_path(os.path.join(out, "table.md")) as tmp, open(tmp, "w") as f:
    f.write(f"{len(keys)} ED/ES pairs; registration at {size}^2; Echo-ODE base config "
            f"{base_label} ({base.steps} steps at the full grid; grid rows may change it)"
            f"\n\n{table}")
  reports.write_json(os.path.join(out, "summary.json"),
                     {n: {"summary": s, **extra.get(n, {}),
                          **({"paired": {"reference": reference, **diffs[n][1]}}
                             if n in diffs else {})}
                      for n, s in summaries.items()})
  worst_figure(pairs, methods, rows, echo_names[0] if echo_names else "copy m_0",
               _WORST.value, os.path.join(out, "worst.png"))
  print(table, end="")


if __name__ == "__main__":
  cli.main(main, huge_pages=True)
