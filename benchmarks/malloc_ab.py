"""The fit step under different mallocs, processes alternating (not in CI; Linux).

  python benchmarks/malloc_ab.py [--rounds=4] [--sizes=128] [--batches=1] \
      [--variants=glibc,glibc_hugetlb,glibc_keep,tcmalloc] [--vs_torch] [--json_out=FILE]

XLA:CPU allocates every step's temporaries afresh (at 128^2 one 330 MB buffer
and a few of 90 MB per step). Under glibc's malloc each of them is a new mmap,
unmapped when freed: a new thread's arena cannot hold them, and glibc limits
its mmap threshold to 32 MB. So every step faults its ~350 MB in again, 4 KiB
at a time, which shows up as kernel (system) CPU time in the step. The
allocator is chosen when the process starts, so this script runs
`fit_speed.py` once per variant and round, variants in turn, and reports per
variant the median over rounds of each row's s/step, page faults and system
seconds per step, and (with --vs_torch) the PyTorch peer's s/step in the same
processes, so under the same malloc:

  glibc          glibc's defaults (ECHO_ODE_MALLOC=default, so fit_speed.py does
                 not restart itself with the tunable);
  glibc_hugetlb  GLIBC_TUNABLES=glibc.malloc.hugetlb=1 (glibc >= 2.35,
                 cpu_malloc.HUGETLB): malloc asks for transparent huge pages,
                 2 MiB per fault;
  glibc_keep     cpu_malloc.TUNABLE (what the scripts restart with): huge
                 pages, and freed memory kept mapped for reuse (one arena,
                 no mmap, no trimming);
  tcmalloc       LD_PRELOAD=libtcmalloc_minimal.so.4 (Debian/Ubuntu package
                 libtcmalloc-minimal4), which keeps freed memory mapped;
  jemalloc       LD_PRELOAD=libjemalloc.so.2 (package libjemalloc2).

A variant whose library is not installed is skipped with a message. The
subprocesses share a JAX compilation cache (a temporary folder, unless
JAX_COMPILATION_CACHE_DIR is set), so compile times after the first round are
cache loads.
"""
import ctypes.util
import json
import os
import subprocess
import sys
import tempfile

from absl import app, flags
import numpy as np

from echo_ode_jax import cpu_malloc, experiment

_ROUNDS = flags.DEFINE_integer("rounds", 4, "fit_speed.py runs per variant.")
_SIZES = flags.DEFINE_list("sizes", ["128"], "fit_speed.py --sizes.")
_BATCHES = flags.DEFINE_list("batches", ["1"], "fit_speed.py --batches.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "fit_speed.py --repeats.")
_VARIANTS = flags.DEFINE_list("variants", ["glibc", "glibc_hugetlb", "glibc_keep", "tcmalloc"],
                              "Mallocs to compare (module docstring).")
_TORCH = flags.DEFINE_bool("vs_torch", False, "fit_speed.py --vs_torch.")
_JSON = flags.DEFINE_string("json_out", None, "Also write every run's rows here.")

_PRELOAD = {"tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}


def variant_env(name: str) -> dict[str, str] | None:
  """The environment additions of a variant; None if its library is not installed."""
  if name == "glibc":
    return {cpu_malloc.OPT_OUT: "default"}
  if name == "glibc_hugetlb":
    return {"GLIBC_TUNABLES": cpu_malloc.HUGETLB}
  if name == "glibc_keep":
    return {"GLIBC_TUNABLES": cpu_malloc.TUNABLE}
  if name in _PRELOAD:
    lib = ctypes.util.find_library(_PRELOAD[name])
    return {"LD_PRELOAD": lib} if lib else None
  raise ValueError(f"unknown variant {name!r}; choose from glibc, glibc_hugetlb, glibc_keep, "
                   f"{', '.join(_PRELOAD)}")


def _run(env_add: dict[str, str], out: str) -> dict:
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fit_speed.py")
  cmd = [sys.executable, script, f"--sizes={','.join(_SIZES.value)}",
         f"--batches={','.join(_BATCHES.value)}", "--inloop_sizes=",
         f"--repeats={_REPEATS.value}", f"--json_out={out}"]
  if _TORCH.value:
    cmd.append("--vs_torch")
  env = dict(os.environ)
  for k in cpu_malloc.MALLOC_ENV + (cpu_malloc.OPT_OUT,):
    env.pop(k, None)
  env.update(env_add)
  subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
  with open(out) as f:
    return json.load(f)


def main(_):
  variants = {}
  for name in _VARIANTS.value:
    env = variant_env(name)
    if env is None:
      print(f"skipping {name}: lib{_PRELOAD[name]} not found (ctypes.util.find_library)")
    else:
      variants[name] = env
  if not variants:
    raise SystemExit("malloc_ab: no variant to run")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="jax_cache_"))
  runs = {name: [] for name in variants}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(_ROUNDS.value):
      for name, env in variants.items():
        res = _run(env, os.path.join(tmp, f"{name}_{r}.json"))
        runs[name].append(res)
        line = ", ".join(f"{row['size']}² b{row['batch']} {row['s_per_step']:.3f} s"
                         for row in res["rows"])
        print(f"round {r + 1}/{_ROUNDS.value} {name}: {line}", flush=True)
  print(f"\nmedians over {_ROUNDS.value} rounds (variants alternating); matmul GFLOP/s "
        + ", ".join(f"{n} {np.median([x['matmul_gflops'] for x in v]):.0f}"
                    for n, v in runs.items()))
  first = next(iter(variants))
  hdr = ("| size | batch | malloc | s/step | faults/step | sys s/step | torch s/step "
         f"| torch/JAX | {first} s/step / this |")
  print(hdr)
  print("|" + "---|" * (hdr.count("|") - 1))
  keys = [(row["size"], row["batch"]) for row in runs[first][0]["rows"]]
  for size, b in keys:
    base = None
    for name in variants:
      rows = [row for res in runs[name] for row in res["rows"]
              if (row["size"], row["batch"]) == (size, b)]
      med = lambda k: float(np.median([row[k] for row in rows])) if k in rows[0] else None
      s = med("s_per_step")
      base = s if base is None else base
      torch_s = med("torch_s_per_step")
      print(f"| {size}² | {b} | {name} | {s:.3f} | {med('minflt_per_step'):.0f} "
            f"| {med('sys_s_per_step'):.3f} | {'' if torch_s is None else f'{torch_s:.3f}'} "
            f"| {'' if torch_s is None else f'{torch_s / s:.2f}'} | {base / s:.2f} |")
  if _JSON.value:
    experiment.write_json(_JSON.value, {"variants": variants, "runs": runs})


if __name__ == "__main__":
  app.run(main)
