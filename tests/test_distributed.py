"""Two local processes (jax.distributed on CPU) share one file's sequences, then resume.

experiments/fit_sequences.py with --coordinator_address/--num_processes/--process_id:
process i fits keys[i::2] and writes its own parts, process 0 merges once both
are done (also when it has nothing to fit itself); a rerun of the same two
commands fits nothing. And fit_file's merge barrier holds when process 0 comes
to it long after process 1.

Slow (about a minute each on 2 cores, mostly compiling or waiting):
run with -m slow.
"""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from echo_ode_jax.data import hdf5, synthetic

ROOT = Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
TIMEOUT_S = 240
# A small fit: one compiled program per process (every batch is 1 sequence of 4
# frames at 16^2), a model without SPADE / PE (compiles in about half the time).
FIT_ARGS = ["--guide=gt", "--config.steps=3", "--batch_size=1", "--size=16",
            "--config.model.use_spade=false", "--config.model.use_pe=false"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(port: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
  env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"   # not every interface
  # One CPU device per process; LLVM -O0 compiles about a third faster.
  env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=1 "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
  # conftest's JAX_COMPILATION_CACHE_DIR is kept. Most of a fit's compile time is
  # a hundred sub-second programs (eager ops, init): cache those too. Only process
  # 0 writes cache entries (and process 1's programs, on device 1, differ).
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return env


def _run(cmds: list[list[str]], port: int, logs: Path,
         timeout: float = TIMEOUT_S) -> list[str]:
  """Runs one process per command; returns their stdout (fails on a hang or an error)."""
  logs.mkdir(parents=True, exist_ok=True)
  procs, files, timed_out = [], [], False
  deadline = time.monotonic() + timeout
  try:
    for i, cmd in enumerate(cmds):
      o, e = open(logs / f"p{i}.out", "w"), open(logs / f"p{i}.err", "w")
      files += [o, e]
      procs.append(subprocess.Popen(cmd, stdout=o, stderr=e, cwd=ROOT, env=_env(port)))
    for p in procs:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
  except subprocess.TimeoutExpired:
    timed_out = True
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()      # SIGKILL: jax.distributed catches SIGTERM (preemption notice)
        p.wait()
    for f in files:
      f.close()
  read = lambda i, ext: (logs / f"p{i}.{ext}").read_text()
  errors = [f"process {i} exited with {p.returncode}:\n{read(i, 'err')[-2000:]}"
            for i, p in enumerate(procs) if p.returncode != 0]
  assert not errors, (f"killed after {timeout} s\n" if timed_out else "") + "\n".join(errors)
  return [read(i, "out") for i in range(len(procs))]


def _run_cli(data, out, logs: Path) -> list[str]:
  """experiments/fit_sequences.py as 2 processes of one jax.distributed run."""
  port = _free_port()
  cmd = [sys.executable, str(ROOT / "experiments" / "fit_sequences.py"), f"--data={data}",
         f"--out={out}", *FIT_ARGS, f"--coordinator_address=127.0.0.1:{port}",
         f"--num_processes={NUM_PROCESSES}"]
  return _run([cmd + [f"--process_id={i}"] for i in range(NUM_PROCESSES)], port, logs)


def _counts(stdout: str) -> dict:
  m = re.search(r"fitted (\d+), failed (\d+), skipped (\d+), bad (\d+)", stdout)
  assert m, stdout
  return dict(zip(("fitted", "failed", "skipped", "bad"), map(int, m.groups())))


def _check_results(out, data, keys):
  assert not Path(f"{out}.parts").exists()                 # merged and cleaned up
  assert hdf5.list_keys(out) == keys
  with h5py.File(out) as f, h5py.File(data) as d:
    for k in keys:
      g = f[k]
      assert int(g.attrs["process_index"]) == keys.index(k) % NUM_PROCESSES, k
      assert g.attrs["status"] == "ok", (k, g.attrs["reason"])
      assert g["pred"].shape == d[k]["img"].shape == (4, 32, 32)
      assert g["pred"].dtype == np.uint8
      assert list(g.attrs["fit_size"]) == [16, 16]
      assert set(np.unique(g["pred"][()])) <= set(range(hdf5.NUM_CLASSES))


@pytest.mark.slow
def test_two_processes_fit_each_sequence_once_and_resume(tmp_path):
  data = tmp_path / "data.h5"
  keys = synthetic.make_dataset(data, 5, size=32, num_frames=4, store_flow=False,
                                progress=False)
  assert keys == hdf5.list_keys(data)
  out = tmp_path / "RESULTS.h5"
  shares = [keys[i::NUM_PROCESSES] for i in range(NUM_PROCESSES)]

  # Each process fits exactly its share; process 0 merges after both are done.
  counts = [_counts(s) for s in _run_cli(data, out, tmp_path / "run1")]
  assert [c["fitted"] for c in counts] == [len(s) for s in shares]
  assert all(c["failed"] == c["skipped"] == c["bad"] == 0 for c in counts)
  # The shares are disjoint and the fitted counts add up to the number of keys,
  # so with every key in the output none was fitted twice (merge would hide it).
  assert sum(c["fitted"] for c in counts) == len(keys)
  _check_results(out, data, keys)

  # Process 1's results lost: process 0 has nothing to fit and reaches the
  # merge at once; it must wait for process 1's parts (tens of seconds: compile).
  with h5py.File(out, "a") as f:
    for k in shares[1]:
      del f[k.split("/")[0]]
  counts = [_counts(s) for s in _run_cli(data, out, tmp_path / "run2")]
  assert [c["fitted"] for c in counts] == [0, len(shares[1])]
  assert [c["skipped"] for c in counts] == [len(shares[0]), 0]
  _check_results(out, data, keys)
  before = out.read_bytes()

  # A rerun of the same two commands: every key is skipped, RESULTS.h5 untouched.
  counts = [_counts(s) for s in _run_cli(data, out, tmp_path / "run3")]
  assert [c["fitted"] for c in counts] == [0] * NUM_PROCESSES
  assert [c["skipped"] for c in counts] == [len(s) for s in shares]
  assert out.read_bytes() == before
  assert not Path(f"{out}.parts").exists()


# Process 0 reaches fit_file's merge barrier LATE_S after process 1 (as if its
# last batch took that long); both have run a computation (as after fitting)
# but have nothing left to fit, so nothing big compiles. A CPU (gloo) collective
# as the barrier fails here: rank 1 gives up on rank 0 after 30 s, and rank 0
# then hangs.
LATE_S = 40
_LATE_SCRIPT = """
import sys, time
import jax, jax.numpy as jnp
from echo_ode_jax import runner
data, out, port, pid = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
jax.distributed.initialize(f"127.0.0.1:{port}", 2, pid)
jax.jit(lambda x: x + 1)(jnp.zeros(2)).block_until_ready()
if pid == 0:
  time.sleep(float(sys.argv[5]))
res = runner.fit_file(data, out, process_index=pid, process_count=2)
print("fitted", len(res["fitted"]), "skipped", len(res["skipped"]))
"""


@pytest.mark.slow
def test_merge_barrier_survives_a_late_process_0(tmp_path):
  data, out = tmp_path / "data.h5", tmp_path / "RESULTS.h5"
  keys = synthetic.make_dataset(data, 2, size=32, num_frames=4, store_flow=False,
                                progress=False)
  assert keys == ["synth0000/4CH", "synth0001/4CH"]
  with h5py.File(out, "w") as f:          # process 0's share is finished already
    f.create_dataset(f"{keys[0]}/pred", data=np.zeros((4, 32, 32), np.uint8))
  parts = tmp_path / "RESULTS.h5.parts"   # process 1's share, not merged yet
  parts.mkdir()
  with h5py.File(parts / "part-p1-0.h5", "w") as f:
    f.create_dataset(f"{keys[1]}/pred", data=np.zeros((4, 32, 32), np.uint8))
  port = _free_port()
  cmds = [[sys.executable, "-c", _LATE_SCRIPT, str(data), str(out), str(port), str(i),
           str(LATE_S)] for i in range(2)]
  t0 = time.monotonic()
  stdout = _run(cmds, port, tmp_path / "logs", timeout=LATE_S + 60)
  assert time.monotonic() - t0 > LATE_S
  for s in stdout:
    assert re.search(r"^fitted 0 skipped 1$", s, re.M), s
  assert hdf5.list_keys(out) == keys
  assert not parts.exists()
