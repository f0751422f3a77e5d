r"""Predicts every frame of every sequence with a trained 2D segmenter.

  python experiments/predict_segmenter.py --data=DATA.h5 --workdir=DIR --out=PRED.h5

Writes /<patient>/<view>/pred (T, H, W) uint8 (the fit-result layout), copying
the view attributes and adding pred_model / pred_config / pred_checkpoint_epoch /
pred_resized. Frames of another size than the trained one are resized in, and
the logits resized back out.
"""
from absl import flags, logging

from echo_ode_jax import cli
from echo_ode_jax.segmenters.predict import write_predictions
from echo_ode_jax.segmenters.train import load_model_state

flags.DEFINE_string("data", None, "HDF5 file (project layout) with img.", required=True)
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).",
                    required=True)
flags.DEFINE_string("out", None, "Output HDF5 file (written atomically).", required=True)
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint to use.")
flags.DEFINE_integer("batch_size", 16, "Frames per forward pass.")
flags.DEFINE_list("keys", None, "Only these <patient>/<view> keys (default: all).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  state = load_model_state(FLAGS.workdir, FLAGS.checkpoint)
  keys = write_predictions(state, FLAGS.data, FLAGS.out, FLAGS.keys, FLAGS.batch_size)
  logging.info("wrote %d sequences to %s", len(keys), FLAGS.out)


if __name__ == "__main__":
  cli.main(main, huge_pages=True)
