"""Fit quality on synthetic sequences with known motion (not in CI).

  python benchmarks/fit_quality.py --out=/tmp/fit_quality [--num=8] [--size=128] \
      [--config.steps=1000] [--guides=gt,none] [--config.model.spade_time=gain]

Writes `num` synthetic sequences (every frame has a ground-truth mask), fits
them with m_0 = the ED ground truth and each guide (`gt`: the ES ground truth;
`none`: image similarity only) through the same runner as
`experiments/fit_sequences.py`, and prints, per guide: the Dice over all
frames (LV endo, epi, myocardium, mDice = mean of endo and epi, and the mean
over the three foreground classes), the folding fraction (share of pixels with
det D phi_t <= 0 over all frames), the minimum Jacobian determinant, the
seconds per sequence, and the same Dice for copying m_0 to every frame (the
no-motion baseline), and one line per sequence. --config.KEY=VALUE sets any
FitConfig field (echo_ode_jax/overrides.py; log_every defaults to steps / 20). Results also go to
`<out>/quality.json`. Each fit is resumable (rerun the same command);
`--summarize_only` merges and summarises the sequences finished so far
without fitting more (for a run stopped part-way).

To use several cores or machines on one output folder, start one process per
shard with `--shard=I/N` (I = 0..N-1; each fits every N-th sequence and writes
its own parts), pinned to its own core, e.g.
`taskset -c I python benchmarks/fit_quality.py --out=DIR --shard=I/2`, then
run `--summarize_only` once all shards have finished.
"""
import json
import os
import time

from absl import app, flags, logging
import numpy as np

from echo_ode_jax import cpu_malloc, metrics, overrides, reports, runner
from echo_ode_jax.data import hdf5, synthetic

_OUT = flags.DEFINE_string("out", None, "Output folder.", required=True)
_NUM = flags.DEFINE_integer("num", 8, "Synthetic sequences.")
_SIZE = flags.DEFINE_integer("size", 128, "Image side (pixels).")
_FRAMES = flags.DEFINE_integer("num_frames", None, "Frames per sequence (default 12-20).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per fit_batch call.")
_GUIDES = flags.DEFINE_list("guides", ["gt", "none"], "Guides to fit with.")
_CONFIG = overrides.define_config_flag()
_SHARD = flags.DEFINE_string("shard", "0/1", "I/N: fit every N-th sequence from the I-th.")
_SUMMARIZE = flags.DEFINE_bool("summarize_only", False,
                               "Summarise the finished sequences; fit nothing.")


def dice_all_frames(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
  """Mean over frames of the Dice of endo (1), epi (1|2), myo (2) and LA (3)."""
  out = {name: float(np.nanmean(metrics.dice_per_frame(pred, gt, name)))
         for name in ("endo", "epi", "myo")}
  out["la"] = float(np.mean([metrics.dice(p == 3, g == 3) for p, g in zip(pred, gt)]))
  out["mdice"] = (out["endo"] + out["epi"]) / 2
  out["mean_classes"] = (out["endo"] + out["myo"] + out["la"]) / 3
  return out


def _summary(data_h5, pred_h5=None):
  with hdf5.open_h5(data_h5) as df:
    keys = hdf5.group_keys(df)
    gts = {k: df[k]["gt"][...] for k in keys}
  if pred_h5 is None:   # copy m_0 to every frame
    rows = {k: dice_all_frames(np.broadcast_to(g[:1], g.shape), g) for k, g in gts.items()}
    return {k: float(np.mean([r[k] for r in rows.values()])) for k in next(iter(rows.values()))}
  with hdf5.open_h5(pred_h5) as pf:
    keys = [k for k in keys if k in pf]      # the finished ones
    preds = {k: pf[k]["pred"][...] for k in keys}
    attrs = {k: {a: hdf5.attr_value(pf[k].attrs[a]) for a in
                 ("status", "seconds", "folding_fraction", "loss_loss", "loss_seg")}
             for k in keys}
  ev = {r["key"]: r for r in metrics.evaluate_files(data_h5, pred_h5, keys)}
  per = {}
  for k in keys:
    d = dice_all_frames(preds[k], gts[k])
    per[k] = {"mdice": round(d["mdice"], 4), "endo": round(d["endo"], 4),
              "folding_fraction": float(attrs[k]["folding_fraction"]),
              "final_loss": float(attrs[k]["loss_loss"]),
              "final_seg": float(attrs[k]["loss_seg"]), "status": attrs[k]["status"]}
    per[k].update({f"_{n}": v for n, v in d.items()})
  out = {n: float(np.mean([per[k]["_" + n] for k in keys]))
         for n in ("endo", "epi", "myo", "la", "mdice", "mean_classes")}
  out["n"] = len(keys)
  out["copy_m0_mdice_same_sequences"] = float(np.mean(
      [dice_all_frames(np.broadcast_to(gts[k][:1], gts[k].shape), gts[k])["mdice"]
       for k in keys]))
  out["folding_fraction"] = float(np.mean([ev[k]["fold_frac"] for k in keys]))
  out["jdet_min"] = float(np.min([ev[k]["jdet_min"] for k in keys]))
  out["failed"] = [k for k in keys if attrs[k]["status"] != "ok"]
  out["seconds_per_sequence"] = float(np.mean([attrs[k]["seconds"] for k in keys]))
  out["per_sequence"] = {k: {n: v for n, v in r.items() if not n.startswith("_")}
                         for k, r in per.items()}
  return out


def _parse_shard(text: str) -> tuple[int, int]:
  try:
    i, n = (int(v) for v in text.split("/"))
  except ValueError:
    raise app.UsageError(f"--shard={text!r}: expected I/N, e.g. 0/2") from None
  if not 0 <= i < n:
    raise app.UsageError(f"--shard={text!r}: need 0 <= I < N")
  return i, n


def main(_):
  cpu_malloc.reexec_with_huge_pages()
  shard, num_shards = _parse_shard(_SHARD.value)
  os.makedirs(_OUT.value, exist_ok=True)
  data = os.path.join(_OUT.value, f"synthetic{_SIZE.value}.h5")
  if not os.path.exists(data):
    synthetic.make_dataset(data, _NUM.value, _SIZE.value, seed=100,
                           num_frames=_FRAMES.value)
  cfg = overrides.fit_config(_CONFIG.value)
  if "log_every" not in overrides.overridden(_CONFIG):
    cfg = cfg.replace(log_every=max(1, cfg.steps // 20))
  report = {"config": json.loads(cfg.to_json()), "num": _NUM.value, "size": _SIZE.value,
            "copy_m0": _summary(data)}
  for guide in _GUIDES.value:
    out = os.path.join(_OUT.value, f"fit_guide_{guide}.h5")
    t0 = time.perf_counter()
    if _SUMMARIZE.value:
      runner.merge(out)
      if not os.path.exists(out):
        continue
    else:
      runner.fit_file(data, out, cfg, init="gt", guide=guide, batch_size=_BATCH.value,
                      save_flow=True, process_index=shard, process_count=num_shards,
                      merge_results=num_shards == 1)
      if num_shards > 1:
        logging.info("guide=%s: shard %d/%d done in %.0f s; summarise with "
                     "--summarize_only once every shard has finished", guide, shard,
                     num_shards, time.perf_counter() - t0)
        continue
    logging.info("guide=%s: %.0f s", guide, time.perf_counter() - t0)
    report[f"guide_{guide}"] = _summary(data, out)
  if num_shards > 1 and not _SUMMARIZE.value:
    return
  reports.write_json(os.path.join(_OUT.value, "quality.json"), report)
  print(json.dumps(report, indent=1))


if __name__ == "__main__":
  app.run(main)
