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

experiment.define_table_flags()
flags.DEFINE_string("table1", None, "Table I summary.json (default: DIR/table1/summary.json).")
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
  app.run(run_cli(main, huge_pages=True))
