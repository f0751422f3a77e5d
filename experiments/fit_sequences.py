"""Fit Echo-ODE to every sequence of an HDF5 file (batched, sharded, resumable).

  python experiments/fit_sequences.py --data=DATA.h5 --out=RESULTS.h5 \
      [--init=gt|segmenter] [--guide=segmenter|gt|none] [--segmentation=PRED.h5] \
      [--steps=1000] [--batch_size=8] [--size=N] [--patients=a,b] [--solver=euler] \
      [--dt=0.1] [--save_flow] [--seed=0] [--lr=0.01] [--lr_decay=constant|cosine] \
      [--clip_norm=N] [--[no]keep_best] [--spade_time=hidden|gain] \
      [--lambda_ncc=W] [--config="ncc_window=9;velocity_stride=2"]

Several processes (e.g. one per machine): start N processes with the same flags plus
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (I = 0..N-1; HOST:PORT
is a free port on process 0's machine, reachable from all). In the file's key order,
process I fits sequences I, I+N, I+2N, ... and writes its finished batches to
<out>.parts/, so --out must be on a filesystem that every process sees; once all have
finished, process 0 merges the parts into --out (every process exits after the merge).
Rerunning the same N commands resumes (finished sequences are skipped).
"""
from absl import app, flags, logging

from echo_ode_jax import experiment, fit, flow, model, runner
from echo_ode_jax.errors import InputError, run_cli

_DATA = flags.DEFINE_string("data", None, "Input HDF5 (the project layout).", required=True)
_OUT = flags.DEFINE_string("out", None, "Results HDF5.", required=True)
_INIT = flags.DEFINE_enum("init", "gt", runner.INITS, "Initial mask m_0 at ED.")
_GUIDE = flags.DEFINE_enum("guide", "segmenter", runner.GUIDES, "Guide m_1 at ES.")
_SEG = flags.DEFINE_string("segmentation", None, "Segmenter predictions (PRED.h5).")
_STEPS = flags.DEFINE_integer("steps", 1000, "Adam steps per sequence.")
_DEF = fit.FitConfig()
_LR = flags.DEFINE_float("lr", _DEF.lr, "Adam learning rate.")
_LR_DECAY = flags.DEFINE_enum("lr_decay", _DEF.lr_decay, ["constant", "cosine"],
                              "Learning-rate schedule (cosine: down to lr * lr_final).")
_LR_FINAL = flags.DEFINE_float("lr_final", _DEF.lr_final, "Final lr fraction of --lr_decay=cosine.")
_CLIP = flags.DEFINE_float("clip_norm", _DEF.clip_norm, "Clip the global gradient norm "
                           "before Adam (0: no clipping).")
_KEEP_BEST = flags.DEFINE_boolean("keep_best", _DEF.keep_best, "Return the parameters of the "
                                  "lowest loss seen (else those of the last step).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per compiled batch.")
_SIZE = flags.DEFINE_integer("size", None, "Fit at size x size (default: data size).")
_PATIENTS = flags.DEFINE_list("patients", None, "Only these patients (or keys).")
_SOLVER = flags.DEFINE_enum("solver", "euler", list(flow.SOLVERS), "ODE solver.")
_DT = flags.DEFINE_float("dt", 0.1, "ODE step size.")
_SIGMA = flags.DEFINE_float("sigma", 1.0, "Gaussian sigma of L_sim (pixels).")
_LAMBDAS = {t: flags.DEFINE_float(f"lambda_{t}", getattr(fit.FitConfig, f"lambda_{t}"),
                                  f"Weight of the {t} term.")
            for t in ("sim", "ncc", "seg", "ef", "jdet", "smt")}
_SPADE = flags.DEFINE_boolean("spade", True, "Temporal SPADE in the decoder.")
_SPADE_TIME = flags.DEFINE_enum("spade_time", "hidden", list(model.SPADE_TIME),
                                "How PE(t) enters SPADE: hidden (PE in its hidden layer) or "
                                "gain (per-channel gains on m_0's maps; faster, another model).")
_PE = flags.DEFINE_boolean("pe", True, "Time positional encoding in the latent space.")
_SAVE_FLOW = flags.DEFINE_boolean("save_flow", False, "Also store phi_t as /flow.")
_SKIP_BAD = flags.DEFINE_boolean("skip_bad", False, "Skip sequences with bad input.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", 1, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", 0, "This process's index.")
_CONFIG = flags.DEFINE_string("config", "", "Any other FitConfig / ModelConfig settings, "
                              'applied after the flags, e.g. "ncc_window=9;velocity_stride=2" '
                              "(ablate.py keys).")


def _config() -> fit.FitConfig:
  """The FitConfig of the flags; a bad value is one InputError line naming its flag."""
  try:
    cfg = fit.FitConfig(
        steps=_STEPS.value, lr=_LR.value, lr_decay=_LR_DECAY.value, lr_final=_LR_FINAL.value,
        clip_norm=_CLIP.value or None, keep_best=_KEEP_BEST.value,
        solver=_SOLVER.value, dt=_DT.value,
        sigma=_SIGMA.value, seed=_SEED.value,
        **{f"lambda_{t}": f.value for t, f in _LAMBDAS.items()},
    ).replace(**{"model.use_spade": _SPADE.value, "model.use_pe": _PE.value,
                 "model.spade_time": _SPADE_TIME.value})
    return experiment.base_config(_CONFIG.value, cfg)
  except InputError as e:
    raise InputError(None, e.problem.replace("--grid", "--config").replace("--base", "--config")
                     ) from None
  except ValueError as e:
    raise InputError(None, str(e).replace("FitConfig.", "--").replace("ModelConfig.", "--")
                     ) from None


def main(argv):
  del argv
  # Every flag is checked before any work.
  if _NPROC.value < 1:
    raise InputError(None, f"--num_processes must be >= 1, got {_NPROC.value}")
  if not 0 <= _PID.value < _NPROC.value:
    raise InputError(None, f"--process_id must be in 0..{_NPROC.value - 1}, got {_PID.value}")
  if _NPROC.value > 1 and not _COORD.value:
    raise InputError(None, "--num_processes > 1 needs --coordinator_address")
  runner.check_run_args(_INIT.value, _GUIDE.value, _BATCH.value, _SIZE.value, prefix="--")
  if _CLIP.value < 0:
    raise InputError(None, f"--clip_norm must be >= 0 (0: no clipping), got {_CLIP.value}")
  cfg = _config()
  if _COORD.value:
    import jax
    jax.distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
  res = runner.fit_file(
      _DATA.value, _OUT.value, cfg, init=_INIT.value, guide=_GUIDE.value,
      segmentation=_SEG.value, patients=_PATIENTS.value, batch_size=_BATCH.value,
      size=_SIZE.value, save_flow=_SAVE_FLOW.value, skip_bad=_SKIP_BAD.value,
      process_index=_PID.value, process_count=_NPROC.value)
  logging.info("done in %.1f s: %d fitted, %d failed, %d skipped (finished before), "
               "%d bad", res["seconds"], len(res["fitted"]), len(res["failed"]),
               len(res["skipped"]), len(res["bad"]))
  for b in res["bad"]:
    logging.warning("bad input: %s", b)
  print(f"fitted {len(res['fitted'])}, failed {len(res['failed'])}, "
        f"skipped {len(res['skipped'])}, bad {len(res['bad'])}")


if __name__ == "__main__":
  app.run(run_cli(main, huge_pages=True))
