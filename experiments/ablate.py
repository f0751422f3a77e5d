r"""Ablation: a grid of fit configs on the same sequences, one table.

  python experiments/ablate.py --data=DATA.h5 --out=DIR \
      --grid="lambda_ef=0,1;spade=true,false;solver=euler,heun" [--base="steps=200"] \
      [--init=gt] [--guide=gt|segmenter|none] [--segmentation=PRED.h5] [--patients=a,b]

Grid keys: FitConfig fields (steps, lr, solver, dt, sigma, lambda_sim, lambda_seg,
lambda_ef, lambda_jdet, lambda_smt, seed, ...), ModelConfig fields (use_spade,
use_pe, pe_dim, spade_hidden, enc_channels=16-32-32-32, ...) and the aliases
spade, pe, i0 and channels (base width c: encoder c,2c,2c,2c; decoder 2c x5,c,c).
The last key varies fastest. --base sets single values the same way.

Each row fits into DIR/rows/<row>/results.h5 and is finished once
DIR/rows/<row>/eval.json exists: a rerun skips finished rows and resumes an
interrupted fit. Writes DIR/metrics.csv (grid_<key> columns), DIR/summary.json
(every row's full config) and DIR/table.md.
"""
from absl import app, flags

from echo_ode_jax import experiment
from echo_ode_jax.errors import run_cli

flags.DEFINE_string("data", None, "Data HDF5 file.", required=True)
flags.DEFINE_string("out", None, "Output folder.", required=True)
flags.DEFINE_string("grid", "", 'Grid, e.g. "lambda_ef=0,1;spade=true,false".')
flags.DEFINE_string("base", "", 'Base settings of every row, e.g. "steps=200;lr=0.005".')
flags.DEFINE_enum("init", "gt", ["gt", "segmenter"], "Initial mask m_0.")
flags.DEFINE_enum("guide", "gt", ["gt", "segmenter", "none"], "Guide at ES (and ED).")
flags.DEFINE_string("segmentation", None, "Segmenter predictions for init/guide=segmenter.")
flags.DEFINE_list("patients", None, "Only these patients (or <patient>/<view> keys).")
flags.DEFINE_integer("batch_size", 8, "Sequences per compiled fit.")
flags.DEFINE_integer("size", None, "Fit at size x size (default: the data size).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  res = experiment.run_ablation(
      FLAGS.data, FLAGS.out, FLAGS.grid, experiment.base_config(FLAGS.base), init=FLAGS.init,
      guide=FLAGS.guide, segmentation=FLAGS.segmentation, patients=FLAGS.patients,
      batch_size=FLAGS.batch_size, size=FLAGS.size)
  print(res["table"], end="")


if __name__ == "__main__":
  app.run(run_cli(main, huge_pages=True))
