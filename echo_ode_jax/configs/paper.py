r"""The paper's fit (section IV): plain Adam at lr 0.01 for 1000 steps on its terms.

The Gaussian-smoothed MSE as the only image similarity (no local NCC), a
constant lr, no gradient clipping, the last parameters returned, R_Jdet at
weight 1 and no R_smt:

  python experiments/fit_sequences.py --data=DATA.h5 --out=RESULTS.h5 \
      --config=echo_ode_jax/configs/paper.py [--config.steps=500]
"""
from echo_ode_jax import overrides
from echo_ode_jax.fit import FitConfig


def get_config():
  return overrides.config_dict_of(FitConfig(
      lambda_ncc=0.0, lr_decay="constant", clip_norm=None, keep_best=False,
      lambda_jdet=1.0, lambda_smt=0.0))
