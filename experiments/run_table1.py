r"""Table I: the 2D segmenters per frame, and Echo-ODE guided by each.

  python experiments/run_table1.py --data=TEST.h5 --checkpoints=CKPT --out=DIR \
      [--segmenters=unet,enet,deeplabv3] [--config.steps=1000] [--config.KEY=VALUE ...] \
      [--batch_size=8] [--figures]

CKPT holds one training workdir per segmenter (CKPT/unet, CKPT/enet,
CKPT/deeplabv3; see experiments/train_segmenter.py). For each segmenter:
DIR/<seg>/pred.h5 (every frame predicted), DIR/<seg>/echo_ode_init-segmenter.h5
(m_0 = its ED prediction, guide = its ES/ED prediction, flows stored) and
cached evaluations; then DIR/table1/{metrics.csv,summary.json,table.md}
(+ figures). Every stage leaves a file; rerunning the command skips finished
stages and resumes an interrupted fit. --config.KEY sets any FitConfig field
(as in fit_sequences.py).
"""
from absl import flags

import _table_flags
from echo_ode_jax import cli, overrides, tables

FLAGS = flags.FLAGS


def main(argv):
  del argv
  res = tables.run_table(FLAGS.data, FLAGS.out, FLAGS.segmenters, FLAGS.checkpoints,
                         "segmenter", overrides.fit_config(_table_flags.CONFIG.value),
                         batch_size=FLAGS.batch_size, size=FLAGS.size, figures=FLAGS.figures,
                         which=FLAGS.checkpoint)
  print(res["table"], end="")


if __name__ == "__main__":
  cli.main(main, huge_pages=True)
