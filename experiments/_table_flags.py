"""The absl flags shared by run_table1.py and run_table2.py."""
from absl import flags

from echo_ode_jax import overrides

flags.DEFINE_string("data", None, "Test data HDF5 (every frame annotated).", required=True)
flags.DEFINE_string("checkpoints", None, "Folder with one segmenter workdir per model.",
                    required=True)
flags.DEFINE_list("segmenters", ["unet", "enet", "deeplabv3"], "Segmenters (workdir names).")
flags.DEFINE_string("out", None, "Output folder.", required=True)
CONFIG = overrides.define_config_flag()
flags.DEFINE_integer("batch_size", 8, "Sequences per compiled fit.")
flags.DEFINE_integer("size", None, "Fit at size x size (default: the data size).")
flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Segmenter checkpoint.")
flags.DEFINE_bool("figures", False, "Write the Fig. 2 / 3b / 4 style PNGs.")
