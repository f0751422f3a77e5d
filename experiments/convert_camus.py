"""Converts CAMUS (2023 NIfTI or 2019 MetaImage layout) into the project's HDF5 layout.

  python experiments/convert_camus.py --camus_dir=DIR --out=FILE.h5 [--size=256]
      [--views=4CH,2CH] [--patients=patient0001,patient0002] [--skip_bad]

Re-running on an existing output adds the missing patients and keeps the rest.
"""
from absl import flags

from echo_ode_jax import cli
from echo_ode_jax.data.convert import DEFAULT_SIZE, convert_camus

flags.DEFINE_string("camus_dir", None, "database_nifti/, training/, testing/ or a folder "
                    "of patientXXXX/ folders", required=True)
flags.DEFINE_string("out", None, "output HDF5 file", required=True)
flags.DEFINE_integer("size", DEFAULT_SIZE, "stored image side in pixels")
flags.DEFINE_list("views", None, "views to convert (default: 4CH,2CH, skipping absent ones; "
                  "an explicit view missing for every patient is an error)")
flags.DEFINE_list("patients", None, "patients to convert (default: all)")
flags.DEFINE_bool("skip_bad", False, "skip patients with bad input (listed at the end)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  rep = convert_camus(FLAGS.camus_dir, FLAGS.out, FLAGS.size, FLAGS.views, FLAGS.patients,
                      FLAGS.skip_bad)
  print(f"{FLAGS.out}: {len(rep.converted)} views converted, {len(rep.existing)} kept, "
        f"{len(rep.missing)} absent, {len(rep.bad)} bad patients")
  for err in rep.bad.values():
    print(f"  bad: {err}")


if __name__ == "__main__":
  cli.main(main)
