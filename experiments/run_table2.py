r"""Table II: Echo-ODE guided by each segmenter, with the ground-truth ED mask as m_0.

  python experiments/run_table2.py --data=TEST.h5 --checkpoints=CKPT --out=DIR \
      [--segmenters=unet,enet,deeplabv3] [--table1=DIR/table1/summary.json] [--steps=1000]

Like run_table1.py (same --out reuses its DIR/<seg>/pred.h5), but m_0 is the
ground truth at ED: DIR/<seg>/echo_ode_init-gt.h5, then
DIR/table2/{metrics.csv,summary.json,table.md}. Each value is followed by its
difference to the Table I row "Echo-ODE (<segmenter>)" in parentheses, as in
the paper, when a Table I summary exists (--table1, default
DIR/table1/summary.json). Resumable like run_table1.py.
"""
from absl import app, flags

from echo_ode_jax import experiment
from echo_ode_jax.errors import run_cli

flags.DEFINE_string("data", None, "Test data HDF5 (every frame annotated).", required=True)
flags.DEFINE_string("checkpoints", None, "Folder with one segmenter workdir per model.",
                    required=True)
flags.DEFINE_list("segmenters", ["unet", "enet", "deeplabv3"], "Segmenters (workdir names).")
flags.DEFINE_string("out", None, "Output folder.", required=True)
flags.DEFINE_string("table1", None, "Table I summary.json (default: DIR/table1/summary.json).")
flags.DEFINE_string("base", "", 'Fit settings, e.g. "steps=1000;lr=0.01" (ablate.py keys).')
flags.DEFINE_integer("steps", None, "Adam steps per sequence (overrides --base).")
flags.DEFINE_integer("batch_size", 8, "Sequences per compiled fit.")
flags.DEFINE_integer("size", None, "Fit at size x size (default: the data size).")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Segmenter checkpoint.")
flags.DEFINE_bool("figures", False, "Write the Fig. 2 / 3b / 4 style PNGs.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  cfg = experiment.base_config(FLAGS.base)
  if FLAGS.steps is not None:
    cfg = cfg.replace(steps=FLAGS.steps)
  res = experiment.run_table(FLAGS.data, FLAGS.out, FLAGS.segmenters, FLAGS.checkpoints,
                             "gt", cfg, baselines=False, reference=FLAGS.table1,
                             batch_size=FLAGS.batch_size, size=FLAGS.size,
                             figures=FLAGS.figures, which=FLAGS.checkpoint)
  print(res["table"], end="")


if __name__ == "__main__":
  app.run(run_cli(main))
