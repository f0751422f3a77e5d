r"""Evaluates predictions / fit results against the ground truth (paper Table I).

  python experiments/evaluate.py --data=DATA.h5 --pred=PRED.h5 --out=DIR [--name=U-Net]
  python experiments/evaluate.py --data=DATA.h5 --pred=PRED.h5 --out=DIR \
      --splits=splits.json --split=valid
  python experiments/evaluate.py --data=DATA.h5 --pred=UNET.h5,ECHO.h5 \
      --name="U-Net,Echo-ODE (U-Net)" --out=DIR --figures

Writes DIR/metrics.csv (one row per method and sequence), DIR/summary.json
({method: {"summary": ...}}) and DIR/table.md (HD ± sd, temporal errors,
mDice, Dice endo, Dice epi, EF MAE ± sd), and prints the table. With
--figures: DIR/fig2_contours.png, fig3b_lv_length.png and, when a results file
stores a flow, fig4_deformation.png.
"""
from absl import flags

from echo_ode_jax import cli, metrics, plots, reports
from echo_ode_jax.errors import InputError
from echo_ode_jax.segmenters.train import split_keys

flags.DEFINE_string("data", None, "Data HDF5 file (img, gt, attrs).", required=True)
flags.DEFINE_list("pred", None, "Prediction or fit results HDF5 file(s), one per method.",
                  required=True)
flags.DEFINE_list("name", None, "Method name(s), one per --pred (default: file names).")
flags.DEFINE_string("out", None, "Output folder.", required=True)
flags.DEFINE_bool("figures", False, "Also write the Fig. 2 / 3b / 4 style PNGs.")
flags.DEFINE_string("key", None, "Sequence <patient>/<view> of the figures (default: first).")
flags.DEFINE_string("splits", None, 'JSON {"train": [...], "valid": [...]} of patient names: '
                    "evaluate only the patients of --split (default: every sequence of --data).")
flags.DEFINE_enum("split", "valid", ["train", "valid"], "The part of --splits to evaluate.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  names = reports.method_names(FLAGS.pred, FLAGS.name)
  reports.check_out_dir(FLAGS.out)
  keys = None
  if FLAGS["split"].present and not FLAGS.splits:
    raise InputError(None, "--split needs --splits (the splits.json whose part to evaluate)")
  if FLAGS.splits:
    train, valid = split_keys(FLAGS.data, FLAGS.splits)
    keys = valid if FLAGS.split == "valid" else train
  results = {n: metrics.evaluate_files(FLAGS.data, p, keys) for n, p in zip(names, FLAGS.pred)}
  reports.write_report(FLAGS.out, results, {n: {"pred": p} for n, p in zip(names, FLAGS.pred)})
  if FLAGS.figures:
    plots.write_figures(FLAGS.data, dict(zip(names, FLAGS.pred)), FLAGS.out, FLAGS.key)
  with open(f"{FLAGS.out}/table.md") as f:
    print(f.read(), end="")


if __name__ == "__main__":
  cli.main(main)
