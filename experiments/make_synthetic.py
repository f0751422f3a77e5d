"""Writes synthetic A4C-like sequences (with the true deformation) to an HDF5 file.

  python experiments/make_synthetic.py --out=synth.h5 --num=20 --size=128 [--seed=0]
"""
from absl import flags

from echo_ode_jax import cli
from echo_ode_jax.data.synthetic import make_dataset

flags.DEFINE_string("out", None, "output HDF5 file", required=True)
flags.DEFINE_integer("num", 10, "number of sequences")
flags.DEFINE_integer("size", 128, "image side in pixels")
flags.DEFINE_integer("seed", 0, "seed of the first sequence (patient synth<seed+i>)")
flags.DEFINE_integer("num_frames", None, "frames per sequence (default: random 12-20)")
flags.DEFINE_float("ef", None, "LV area ejection fraction (default: random 0.35-0.70)")
flags.DEFINE_bool("store_flow", True, "store the true pull-back maps as flow_true")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  make_dataset(FLAGS.out, FLAGS.num, FLAGS.size, FLAGS.seed, FLAGS.num_frames, FLAGS.ef,
               store_flow=FLAGS.store_flow)


if __name__ == "__main__":
  cli.main(main)
