"""--quick, shared by the quality benchmarks: a smaller run, flag by flag unless given.

--quick sets --size=64 and --num=12 unless those flags are given, and the
fit's steps to 300 unless --config.steps or a --config=FILE is given (a named
setting keeps its own steps).
"""
from __future__ import annotations

from absl import flags

from echo_ode_jax import overrides

QUICK = {"size": 64, "steps": 300, "num": 12}


def define_flag():
  return flags.DEFINE_boolean("quick", False, "--size=64 --config.steps=300 --num=12 unless "
                              "given.")


def apply_flags(quick) -> None:
  """Sets --size and --num to QUICK's values when `quick` is on and they were not given."""
  for name, v in QUICK.items():
    if quick.value and name != "steps" and not flags.FLAGS[name].present:
      flags.FLAGS[name].value = v


def fit_config(quick, config, flag_values=flags.FLAGS):
  """The FitConfig of the `config` flag, with QUICK's steps when `quick` is on and
  neither --config.steps nor a --config=FILE was given."""
  cfg = overrides.fit_config(config.value)
  if (quick.value and "steps" not in overrides.overridden(config, flag_values)
      and not overrides.config_file(config, flag_values)):
    cfg = cfg.replace(steps=QUICK["steps"])
  return cfg
