r"""Is Echo-ODE's gap to ANTs on real ED/ES pairs its objective or its optimiser?

  .venv-bench/bin/python benchmarks/objective_gap.py --run=DIR \
      --echo=DIR/pred_echo_<row>.h5 [--method="Echo-ODE ..."] [--transform=SyNCC] [--num=N]

DIR is a finished `registration_quality.py` output folder (its pairs.h5,
results.csv and the Echo-ODE row's masks file, which records each fit's config
and final loss terms). For every pair, ANTs (`--transform`) registers ED onto
ES on the fit grid as in that run, its map is read as positions in pixels
(`_ants.register_map`), and Echo-ODE's objective (`losses.terms_from_phi` with
the fit's FitConfig, on the sequence prepared as the fit prepared it) is
evaluated at that map and at the identity. Written to DIR:

  objective_gap_<transform>.csv   per pair: each term and the total for the
                                  Echo-ODE fit, the ANTs map and the identity,
                                  and both methods' ES Dice (results.csv)

and printed: on how many pairs the ANTs map scores a lower objective than the
fit, overall and on the pairs where ANTs's endo Dice is higher. Lower there
means the fit stopped short of a better optimum of its own objective (an
optimiser gap); higher means the objective prefers what the fit found (an
objective gap).
"""
from __future__ import annotations

import csv
import json
import os
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _ants  # noqa: E402
from echo_ode_jax import cli, flow, losses, reports, runner  # noqa: E402
from echo_ode_jax._progress import Progress  # noqa: E402
from echo_ode_jax.config import FitConfig  # noqa: E402
from echo_ode_jax.sequence import prepare_sequence  # noqa: E402

_RUN = flags.DEFINE_string("run", None, "A registration_quality.py output folder.",
                           required=True)
_ECHO = flags.DEFINE_string("echo", None, "The Echo-ODE row's masks file in --run.",
                            required=True)
_TRANSFORM = flags.DEFINE_string("transform", "SyNCC", "ants.registration type_of_transform.")
_METHOD = flags.DEFINE_string("method", None, "The --echo row's name in results.csv "
                              "(needed when results.csv has several Echo-ODE rows).")
_NUM = flags.DEFINE_integer("num", None, "Only the first N pairs (sorted).")

TERMS = losses.TERMS


def objective(phi_es: np.ndarray, seq: dict, cfg: FitConfig) -> dict[str, float]:
  """Echo-ODE's unweighted terms and weighted total for the map phi_es at ES
  ((H, W, 2) pixels) and the identity at ED, on a prepared 2-frame sequence."""
  h, w = phi_es.shape[:2]
  ident = flow.identity_grid(h, w, jnp.float32)
  t_pad = seq["images"].shape[0]
  phi = jnp.stack([ident] + [jnp.asarray(phi_es)] * (t_pad - 1))
  terms = losses.terms_from_phi(phi, jax.tree_util.tree_map(jnp.asarray, seq), cfg)
  out = {k: float(v) for k, v in terms.items()}
  out["loss"] = float(losses.total_loss(terms, cfg))
  return out


def main(argv):
  del argv
  _ants.import_ants()
  run, transform = _RUN.value, _TRANSFORM.value
  pairs = os.path.join(run, "pairs.h5")
  with h5py.File(_ECHO.value, "r") as f:
    fits = {f"{p}/{v}": dict(f[p][v].attrs) for p in f for v in f[p]
            if f[p][v].attrs.get("status") == "ok"}
  keys = sorted(fits)[:_NUM.value]
  dice = {}
  with open(os.path.join(run, "results.csv")) as f:
    for r in csv.DictReader(f):
      dice[(r["method"], r["key"])] = float(r.get("dice_endo") or "nan")
  echo_methods = sorted({m for m, _ in dice if m.startswith("Echo-ODE")})
  if _METHOD.value is None and len(echo_methods) > 1:
    raise app.UsageError(f"{run}/results.csv has {len(echo_methods)} Echo-ODE rows: name the one "
                         f"of --echo with --method (one of: {'; '.join(echo_methods)})")
  echo_method = _METHOD.value or (echo_methods[0] if echo_methods else None)
  rows = []
  prog = Progress(len(keys), f"ANTs {transform} maps under the objective", "pair")
  for key in keys:
    attrs = fits[key]
    cfg = FitConfig.from_dict(json.loads(attrs["config"]))
    size = int(attrs["size"])
    inp = runner.load_inputs(pairs, key, init="gt", guide="none", size=size)
    seq = prepare_sequence(inp.images, inp.m0, cfg=cfg)
    phi = _ants.register_map(inp.images[1], inp.images[0], transform,
                             full_shape=inp.data_shape)
    ident = np.asarray(flow.identity_grid(*inp.images.shape[1:3], jnp.float32))
    row = {"key": key}
    for who, terms in (("ants", objective(phi, seq, cfg)),
                       ("identity", objective(ident, seq, cfg)),
                       ("echo", {k: float(attrs[f"loss_{k}"]) for k in (*TERMS, "loss")})):
      row.update({f"{who}_{k}": v for k, v in terms.items()})
    row["dice_endo_echo"] = dice.get((echo_method, key), float("nan"))
    row["dice_endo_ants"] = dice.get((f"ANTs {transform}", key), float("nan"))
    rows.append(row)
    prog.update(1)
  path = os.path.join(run, f"objective_gap_{transform}.csv")
  reports.write_csv(path, rows)
  lower = [r for r in rows if r["ants_loss"] < r["echo_loss"]]
  worse = [r for r in rows if r["dice_endo_ants"] > r["dice_endo_echo"]]
  both = [r for r in worse if r["ants_loss"] < r["echo_loss"]]
  mean = lambda rs, k: float(np.mean([r[k] for r in rs])) if rs else float("nan")
  print(f"{len(rows)} pairs; objective of the fit {mean(rows, 'echo_loss'):.4f}, of the "
        f"ANTs {transform} map {mean(rows, 'ants_loss'):.4f}, of the identity "
        f"{mean(rows, 'identity_loss'):.4f} (means)")
  for k in TERMS:
    print(f"  {k}: fit {mean(rows, 'echo_' + k):.4g}, ANTs {mean(rows, 'ants_' + k):.4g}, "
          f"identity {mean(rows, 'identity_' + k):.4g}")
  print(f"ANTs map scores lower than the fit on {len(lower)} of {len(rows)} pairs; "
        f"on {len(both)} of the {len(worse)} pairs where ANTs's endo Dice is higher")
  logging.info("wrote %s", path)


if __name__ == "__main__":
  cli.main(main)
