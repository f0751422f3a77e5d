r"""The FitConfig defaults: the `--config` of the fitting scripts.

Every field of FitConfig (and of its ModelConfig under ``model.``) can be set on
the command line:

  python experiments/fit_sequences.py --data=DATA.h5 --out=RESULTS.h5 \
      --config.steps=500 --config.lr=0.005 --config.clip_norm=none \
      --config.model.use_spade=false --config.model.enc_channels='(8,16,16,16)'

A copy of this file with other values is a named setting:
``--config=my_config.py --config.seed=1`` (overrides after the file).
"""
from echo_ode_jax import overrides
from echo_ode_jax.fit import FitConfig


def get_config():
  return overrides.config_dict_of(FitConfig())
