r"""Table II: Echo-ODE guided by each segmenter, with the ground-truth ED mask as m_0.

  python experiments/run_table2.py --data=TEST.h5 --checkpoints=CKPT --out=DIR \
      [--segmenters=unet,enet,deeplabv3] [--table1=DIR/table1/summary.json] \
      [--config.steps=1000] [--config.KEY=VALUE ...]

Like run_table1.py (same --out reuses its DIR/<seg>/pred.h5), but m_0 is the
ground truth at ED: DIR/<seg>/echo_ode_init-gt.h5, then
DIR/table2/{metrics.csv,summary.json,table.md}. Each value is followed by its
difference to the Table I row "Echo-ODE (<segmenter>)" in parentheses, as in
the paper, when a Table I summary exists (--table1, default
DIR/table1/summary.json). Resumable like run_table1.py.
"""
from absl import flags

import _table_flags
from echo_ode_jax import cli, overrides, tables

flags.DEFINE_string("table1", None, "Table I summary.json (default: DIR/table1/summary.json).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  res = tables.run_table(FLAGS.data, FLAGS.out, FLAGS.segmenters, FLAGS.checkpoints, "gt",
                         overrides.fit_config(_table_flags.CONFIG.value), baselines=False,
                         reference=FLAGS.table1, batch_size=FLAGS.batch_size, size=FLAGS.size,
                         figures=FLAGS.figures, which=FLAGS.checkpoint)
  print(res["table"], end="")


if __name__ == "__main__":
  cli.main(main, huge_pages=True)
