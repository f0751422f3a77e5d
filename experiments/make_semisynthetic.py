"""Semi-synthetic full-cycle sequences from real CAMUS ED/ES pairs (HDF5, optionally CAMUS NIfTI).

  python experiments/make_semisynthetic.py --camus_dir=CAMUS/database_nifti --out=semi.h5 \
      [--size=128] [--num=10] [--seed=0] [--nifti_out=DIR] [--patients=patient0001,2] \
      [--splits=CAMUS/splits.json --split=valid]

Per patient a smooth diffeomorphism carrying the ED masks onto the ES masks is
fitted; frame k is the ED image and mask pulled back through it at a cardiac-like
time, with fresh speckle (echo_ode_jax/data/semisynthetic.py). The Dice of each
synthetic ES mask against the real one is logged as a table and written to
<out stem>_es_dice.csv.
"""
from absl import flags

from echo_ode_jax import cli
from echo_ode_jax.data import semisynthetic

flags.DEFINE_string("camus_dir", None, "CAMUS database_nifti/ (or any folder of patient folders)",
                    required=True)
flags.DEFINE_string("out", None, "output HDF5 file", required=True)
flags.DEFINE_integer("size", 128, "stored image side in pixels")
flags.DEFINE_integer("num", None, "at most this many patients (the first, by name)")
flags.DEFINE_integer("seed", 0, "seed (with the patient name: frame count, time profile, noise)")
flags.DEFINE_string("nifti_out", None, "also write the CAMUS 2023 NIfTI layout into this folder")
flags.DEFINE_list("patients", None, "patients to use (patient0001 or 1); default all")
flags.DEFINE_string("splits", None, "splits JSON ({\"train\": [...], \"valid\": [...]})")
flags.DEFINE_string("split", "valid", "the list of --splits to use")
flags.DEFINE_string("view", "4CH", "view to use")
flags.DEFINE_integer("num_frames", None, "frames per sequence (default: random 12-20)")
flags.DEFINE_integer("grid", semisynthetic.MapConfig.grid, "control grid side of the velocity")
flags.DEFINE_integer("steps", semisynthetic.MapConfig.steps, "Adam steps of the map fit")
flags.DEFINE_float("smooth", semisynthetic.MapConfig.smooth, "smoothness weight of the map fit")
flags.DEFINE_float("speckle", semisynthetic.NoiseConfig.speckle, "multiplicative speckle strength")
flags.DEFINE_float("noise", semisynthetic.NoiseConfig.noise, "additive Gaussian noise std")
flags.DEFINE_bool("store_flow", True, "store the true pull-back maps as flow_true")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  map_cfg = semisynthetic.MapConfig(grid=FLAGS.grid, steps=FLAGS.steps, smooth=FLAGS.smooth)
  noise_cfg = semisynthetic.NoiseConfig(speckle=FLAGS.speckle, noise=FLAGS.noise)
  semisynthetic.make_dataset(
      FLAGS.camus_dir, FLAGS.out, size=FLAGS.size, seed=FLAGS.seed, num=FLAGS.num,
      patients=FLAGS.patients, splits=FLAGS.splits, split=FLAGS.split,
      nifti_out=FLAGS.nifti_out, view=FLAGS.view, num_frames=FLAGS.num_frames,
      map_cfg=map_cfg, noise_cfg=noise_cfg, store_flow=FLAGS.store_flow)


if __name__ == "__main__":
  cli.main(main)
