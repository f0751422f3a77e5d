"""The loss-gradient test case shared by step_profile.py and cpu_levers.py."""
import jax
import jax.numpy as jnp

from echo_ode_jax import fit
from echo_ode_jax import model as model_lib
from echo_ode_jax.data import synthetic


def profile_case(cfg: fit.FitConfig, size: int, frames: int):
  """(prepared sequence as device arrays, params) on the synthetic sequence of
  fit_speed.py: the initial parameters plus N(0, 0.05) noise, so the
  zero-initialised layers carry gradient."""
  s, _ = synthetic.make_sequence(0, size=size, num_frames=frames)
  seq = jax.tree_util.tree_map(jnp.asarray,
                               fit.prepare_sequence(s.img, s.gt[0], s.gt[-1], cfg=cfg))
  params = model_lib.init_params(cfg.model, jax.random.PRNGKey(0), (size, size))
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree_util.tree_unflatten(
      tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  return seq, params
