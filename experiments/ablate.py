r"""Ablation: a grid of fit configs on the same sequences, one table.

  python experiments/ablate.py --data=DATA.h5 --out=DIR \
      --grid="lambda_ef=0,1;model.use_spade=true,false;solver=euler,heun" \
      [--config.steps=200] [--config.KEY=VALUE ...] \
      [--init=gt] [--guide=gt|segmenter|none] [--segmentation=PRED.h5] [--patients=a,b]

Grid keys are the --config keys: FitConfig fields (steps, lr, solver, dt, sigma,
lambda_sim, lambda_seg, lambda_ef, lambda_jdet, lambda_smt, seed, ...), model
fields as model.KEY (model.use_spade, model.use_pe, model.pe_dim,
model.enc_channels=16-32-32-32, ...), and channels (the base width c: encoder
c,2c,2c,2c; decoder 2c x5,c,c). The last key varies fastest. --config.KEY sets
the base of every row.

Each row fits into DIR/rows/<row>/results.h5 and is finished once
DIR/rows/<row>/eval.json exists: a rerun skips finished rows and resumes an
interrupted fit. Writes DIR/metrics.csv (grid_<key> columns), DIR/summary.json
(every row's full config) and DIR/table.md.
"""
from absl import flags

from echo_ode_jax import cli, overrides, tables

flags.DEFINE_string("data", None, "Data HDF5 file.", required=True)
flags.DEFINE_string("out", None, "Output folder.", required=True)
flags.DEFINE_string("grid", "", 'Grid, e.g. "lambda_ef=0,1;model.use_spade=true,false".')
_CONFIG = overrides.define_config_flag()
flags.DEFINE_enum("init", "gt", ["gt", "segmenter"], "Initial mask m_0.")
flags.DEFINE_enum("guide", "gt", ["gt", "segmenter", "none"], "Guide at ES (and ED).")
flags.DEFINE_string("segmentation", None, "Segmenter predictions for init/guide=segmenter.")
flags.DEFINE_list("patients", None, "Only these patients (or <patient>/<view> keys).")
flags.DEFINE_integer("batch_size", 8, "Sequences per compiled fit.")
flags.DEFINE_integer("size", None, "Fit at size x size (default: the data size).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  res = tables.run_ablation(
      FLAGS.data, FLAGS.out, FLAGS.grid, overrides.fit_config(_CONFIG.value), init=FLAGS.init,
      guide=FLAGS.guide, segmentation=FLAGS.segmentation, patients=FLAGS.patients,
      batch_size=FLAGS.batch_size, size=FLAGS.size)
  print(res["table"], end="")


if __name__ == "__main__":
  cli.main(main, huge_pages=True)
