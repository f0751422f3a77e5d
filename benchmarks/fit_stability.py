"""One synthetic sequence fitted under several optimiser / loss-weight variants (not in CI).

  python benchmarks/fit_stability.py --out=/tmp/fit_quality --size=64 --key=synth0102 \
      --variants='{"lr_decay": "constant", "clip_norm": null, "keep_best": false, "lambda_jdet": 1};{"lambda_jdet": 1};{};{"lambda_smt": 1}'

Uses the data file of `benchmarks/fit_quality.py` (made there if absent: the
same seed, so the same sequences) and the key the runner gives the sequence
(fold_in(PRNGKey(0), index in the file)), so a variant reproduces what
fit_quality's batch fit does to that sequence. Each variant is a JSON object of
FitConfig overrides on top of the defaults. Prints one JSON line per variant:
Dice over all frames (endo, epi), folding fraction, best step, final / last
loss, the largest loss after step 100 (the spikes) and seconds.
"""
import json
import os
import time

from absl import app, flags
import jax
import numpy as np

from echo_ode_jax import cpu_malloc, fit, metrics, runner
from echo_ode_jax.data import hdf5, synthetic

_OUT = flags.DEFINE_string("out", None, "Folder of fit_quality's data file.", required=True)
_SIZE = flags.DEFINE_integer("size", 64, "Image side (pixels).")
_NUM = flags.DEFINE_integer("num", 8, "Sequences in the data file (when it is made here).")
_KEY = flags.DEFINE_string("key", "synth0102", "Patient of the sequence to fit.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Adam steps.")
_VARIANTS = flags.DEFINE_string("variants", "{}", "';'-separated JSON FitConfig overrides.")


def main(_):
  cpu_malloc.reexec_with_huge_pages()
  data = os.path.join(_OUT.value, f"synthetic{_SIZE.value}.h5")
  if not os.path.exists(data):
    os.makedirs(_OUT.value, exist_ok=True)
    synthetic.make_dataset(data, _NUM.value, _SIZE.value, seed=100)
  keys = hdf5.list_keys(data)
  key = next(k for k in keys if k.split("/")[0] == _KEY.value)
  inp = runner.load_inputs(data, key, "gt", "gt")
  gt = hdf5.read_sequence(data, key).gt
  for text in _VARIANTS.value.split(";"):
    variant = json.loads(text)
    cfg = fit.FitConfig(steps=_STEPS.value, log_every=100).replace(**variant)
    seq = fit.prepare_sequence(inp.images, inp.m0, inp.guide_es, inp.guide_ed, cfg)
    t0 = time.perf_counter()
    r = fit.fit_sequence(seq, cfg, key=jax.random.fold_in(jax.random.PRNGKey(cfg.seed),
                                                         keys.index(key)))
    loss = r.history["loss"]
    print(json.dumps({
        "key": key, "variant": variant,
        "endo": round(float(np.mean(metrics.dice_per_frame(r.masks, gt, "endo"))), 4),
        "epi": round(float(np.mean(metrics.dice_per_frame(r.masks, gt, "epi"))), 4),
        "folding_fraction": r.folding_fraction, "best_step": r.best_step,
        "final_loss": r.final["loss"], "last_loss": float(loss[-1]),
        "max_loss_after_100": float(np.max(loss[100:])) if loss.size > 100 else None,
        "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
  app.run(main)
