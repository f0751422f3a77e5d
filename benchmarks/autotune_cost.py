r"""The first-use cost of the CPU kernel autotuning (kernels/cpu/autotune.py).

For each size, a 3-step fit of one synthetic 12-frame sequence runs in a fresh
process, with a kernel cache (ECHO_ODE_NATIVE_CACHE, a temporary folder) that
holds the native build and the measured choices ("cached") and with the choices
removed ("tune"), alternating; the difference is the time the measurement adds
once per host, CPU model and library version:

  python benchmarks/autotune_cost.py [--sizes=128,256] [--repeats=2]
"""
from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_SIZES = flags.DEFINE_list("sizes", ["128", "256"], "Image sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Alternating tune / cached pairs per size.")

CHILD = """
import sys
from echo_ode_jax import fit
from echo_ode_jax.data import synthetic
size = int(sys.argv[1])
seq, _ = synthetic.make_sequence(0, size=size, num_frames=12)
cfg = fit.FitConfig(steps=3, log_every=3)
fit.fit_sequence(fit.prepare_sequence(seq.img, seq.gt[0], cfg=cfg), cfg)
"""


def _run(size: int, env: dict) -> float:
  t0 = time.perf_counter()
  subprocess.run([sys.executable, "-c", CHILD, str(size)], env=env, check=True,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return time.perf_counter() - t0


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as cache:
    env = dict(os.environ, ECHO_ODE_NATIVE_CACHE=cache, ECHO_ODE_NATIVE="auto")
    for size in map(int, _SIZES.value):
      _run(size, env)   # builds the kernels (and tunes) once
      tune, cached = [], []
      for _ in range(_REPEATS.value):
        for f in glob.glob(os.path.join(cache, "choices_*.json")):
          os.remove(f)
        tune.append(_run(size, env))
        cached.append(_run(size, env))
      print(f"{size}^2: process wall time, tune {' '.join(f'{t:.1f}' for t in tune)} s, "
            f"cached {' '.join(f'{t:.1f}' for t in cached)} s; autotuning adds "
            f"{min(tune) - min(cached):.1f} s (best of each)", flush=True)


if __name__ == "__main__":
  app.run(main)
