r"""The loss of one ED/ES pair's fit around the start of every stage.

  python benchmarks/stage_trace.py --pairs=RUN/pairs.h5 --key=patient0271/4CH \
      --size=128 --config=echo_ode_jax/configs/coarse_to_fine.py:128 [--config.warmup_steps=10]

Fits the pair as registration_quality.py does (the gt ED mask, no guide, at
--size) and prints, for each stage of fit.pyramid, the loss at the stage's
first steps, its lowest and its last, and the step whose parameters the fit
returns. A stage whose lowest loss is its first never improved on what it
started from.
"""
from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from echo_ode_jax import fit, metrics, overrides, runner
from echo_ode_jax.data import hdf5

_PAIRS = flags.DEFINE_string("pairs", None, "A registration_quality.py pairs.h5.", required=True)
_KEY = flags.DEFINE_string("key", None, "patient/view.", required=True)
_SIZE = flags.DEFINE_integer("size", 128, "Fit grid side, pixels.")
_FIRST = flags.DEFINE_integer("first", 6, "Steps printed at each stage's start.")
_CONFIG = overrides.define_config_flag()


def main(argv):
  del argv
  cfg = overrides.fit_config(_CONFIG.value)
  inp = runner.load_inputs(_PAIRS.value, _KEY.value, init="gt", guide="none", size=_SIZE.value)
  index = hdf5.list_keys(_PAIRS.value).index(_KEY.value)
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), index)
  res = fit.fit_sequence(fit.prepare_sequence(inp.images, inp.m0, cfg=cfg), cfg, key=key)
  loss = np.asarray(res.history["loss"], np.float64)
  start = 0
  print(f"{_KEY.value}, {_SIZE.value}², returned step {res.best_step}")
  print("| stage | grid reduction | steps | first losses | lowest (step) | last |")
  print("|:-:|:-:|:-:|---|:-:|:-:|")
  for i, (f, c) in enumerate(fit.pyramid(cfg)):
    seg = loss[start:start + c.steps]
    first = " ".join(f"{x:.4f}" for x in seg[:_FIRST.value])
    print(f"| {i + 1} | {f} | {c.steps} | {first} | {seg.min():.4f} ({start + int(seg.argmin())})"
          f" | {seg[-1]:.4f} |")
    start += c.steps
  gt_es = runner.resize(hdf5.read_sequence(_PAIRS.value, _KEY.value).gt[1], inp.images.shape[1:], 0)
  def ef(ed, es):
    return metrics.ejection_fraction(metrics.lv_area_mm2(ed), metrics.lv_area_mm2(es))
  print(f"area EF at the fit grid: propagated {ef(res.masks[0], res.masks[-1]):.1f}, "
        f"true {ef(res.masks[0], gt_es):.1f}")


if __name__ == "__main__":
  app.run(main)
