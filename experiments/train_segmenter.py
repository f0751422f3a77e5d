r"""Trains a 2D segmenter (U-Net, ENet, DeepLabv3) on the annotated frames of an HDF5 file.

  python experiments/train_segmenter.py --data=DATA.h5 --model=unet --workdir=DIR \
      [--size=128] [--epochs=100] [--batch_size=8] [--lr=1e-3] [--splits=splits.json]

Re-running the same command continues after the last finished epoch. The workdir
gets config.json, last.msgpack, best.msgpack and history.json.
"""
import json

from absl import app, flags, logging

from echo_ode_jax import cli
from echo_ode_jax.segmenters import MODELS
from echo_ode_jax.segmenters.train import TrainConfig, data_size, train

_DEF = TrainConfig()
flags.DEFINE_string("data", None, "HDF5 file (project layout) with img and gt.", required=True)
flags.DEFINE_enum("model", "unet", sorted(MODELS), "Segmenter.")
flags.DEFINE_string("workdir", None, "Checkpoints, config and history go here.", required=True)
flags.DEFINE_integer("size", None, "Training size (default: the data's size).")
flags.DEFINE_integer("epochs", _DEF.epochs, "Maximum number of epochs.")
flags.DEFINE_integer("batch_size", _DEF.batch_size, "Batch size.")
flags.DEFINE_float("lr", _DEF.lr, "Adam learning rate (the paper used 0.01).")
flags.DEFINE_string("splits", None, 'JSON {"train": [...], "valid": [...]} of patient names; '
                    "default: a deterministic 90/10 split by patient.")
flags.DEFINE_enum("loss", _DEF.loss, ["dice", "dice_ce"], "Dice, or Dice + cross-entropy.")
flags.DEFINE_integer("patience", _DEF.patience, "Early stopping: epochs without a better "
                     "validation loss.")
flags.DEFINE_integer("seed", _DEF.seed, "Seed (init, split, shuffling, augmentation).")
flags.DEFINE_bool("augment", _DEF.augment, "Rotation, scaling, shift and gamma augmentation.")
flags.DEFINE_string("model_kwargs", "{}", 'JSON keyword options of the model, e.g. '
                    '\'{"widths": [16, 32, 64, 128]}\' or \'{"depth": 50}\'.')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  try:
    model_kwargs = json.loads(FLAGS.model_kwargs)
  except json.JSONDecodeError as e:
    raise app.UsageError(f"--model_kwargs is not JSON: {e}") from None
  cfg = TrainConfig(model=FLAGS.model, model_kwargs=model_kwargs,
                    size=FLAGS.size or data_size(FLAGS.data), epochs=FLAGS.epochs,
                    batch_size=FLAGS.batch_size, lr=FLAGS.lr, loss=FLAGS.loss,
                    patience=FLAGS.patience, seed=FLAGS.seed, augment=FLAGS.augment)
  best = train(cfg, FLAGS.data, FLAGS.workdir, FLAGS.splits)
  logging.info("best epoch: %s", json.dumps(best))


if __name__ == "__main__":
  cli.main(main, huge_pages=True)
