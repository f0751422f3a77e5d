r"""Fit Echo-ODE to every sequence of an HDF5 file (batched, sharded, resumable).

  python experiments/fit_sequences.py --data=DATA.h5 --out=RESULTS.h5 \
      [--init=gt|segmenter] [--guide=segmenter|gt|none] [--segmentation=PRED.h5] \
      [--batch_size=8] [--size=N] [--patients=a,b] [--save_flow] [--skip_bad] \
      [--config.steps=1000] [--config.lr=0.01] [--config.solver=heun] \
      [--config.clip_norm=none] [--config.model.use_spade=false] [--config.KEY=VALUE ...]

--config.KEY sets any FitConfig field (model fields as --config.model.KEY;
echo_ode_jax/configs/fit.py), --config=FILE.py a get_config() file of your own.

Several processes (e.g. one per machine): start N processes with the same flags plus
--coordinator_address=HOST:PORT --num_processes=N --process_id=I (I = 0..N-1; HOST:PORT
is a free port on process 0's machine, reachable from all). In the file's key order,
process I fits sequences I, I+N, I+2N, ... and writes its finished batches to
<out>.parts/, so --out must be on a filesystem that every process sees; once all have
finished, process 0 merges the parts into --out (every process exits after the merge).
Rerunning the same N commands resumes (finished sequences are skipped).
"""
import jax
from absl import flags, logging

from echo_ode_jax import cli, overrides, runner
from echo_ode_jax.errors import InputError

_DATA = flags.DEFINE_string("data", None, "Input HDF5 (the project layout).", required=True)
_OUT = flags.DEFINE_string("out", None, "Results HDF5.", required=True)
_CONFIG = overrides.define_config_flag()
_INIT = flags.DEFINE_enum("init", "gt", runner.INITS, "Initial mask m_0 at ED.")
_GUIDE = flags.DEFINE_enum("guide", "segmenter", runner.GUIDES, "Guide m_1 at ES.")
_SEG = flags.DEFINE_string("segmentation", None, "Segmenter predictions (PRED.h5).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per compiled batch.")
_SIZE = flags.DEFINE_integer("size", None, "Fit at size x size (default: data size).")
_PATIENTS = flags.DEFINE_list("patients", None, "Only these patients (or keys).")
_SAVE_FLOW = flags.DEFINE_boolean("save_flow", False, "Also store phi_t as /flow.")
_SKIP_BAD = flags.DEFINE_boolean("skip_bad", False, "Skip sequences with bad input.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", 1, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", 0, "This process's index.")


def main(argv):
  del argv
  # Every flag is checked before any work.
  if _NPROC.value < 1:
    raise InputError(None, f"--num_processes must be >= 1, got {_NPROC.value}")
  if not 0 <= _PID.value < _NPROC.value:
    raise InputError(None, f"--process_id must be in 0..{_NPROC.value - 1}, got {_PID.value}")
  if _NPROC.value > 1 and not _COORD.value:
    raise InputError(None, "--num_processes > 1 needs --coordinator_address")
  cfg = overrides.fit_config(_CONFIG.value)
  runner.check_run_args(_INIT.value, _GUIDE.value, _BATCH.value, _SIZE.value, prefix="--",
                        propagation=cfg.propagation)
  if _COORD.value:
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
  cli.main(main, huge_pages=True)
