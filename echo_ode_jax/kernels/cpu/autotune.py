"""Native kernel or XLA's op, per operation and shape, measured on this host.

The native kernels are faster than XLA:CPU's ops on some CPUs and slower on
others (BENCHMARKS.md, "Native kernels per host"), so the first time an
operation is traced for a shape, both implementations are compiled and timed
on random operands of that shape (:func:`measure`: a warm-up call, then the
best of a few) and the faster one is used from then on: the native one only
when it is strictly faster. The choices are kept in memory and in a JSON file
next to the native build (:func:`cache_path`), named by a hash of the CPU
model, the usable cores, jaxlib's version and the kernel source
(:func:`cache_key`), so another host, a jaxlib upgrade or a kernel change
measures again. An unreadable or unwritable file only costs the measurement
(logged once). ``ECHO_ODE_NATIVE=on``/``off`` skips the measurement (native
wherever supported / XLA only; :func:`echo_ode_jax.kernels.cpu.native.mode`).

The measurement runs in a helper thread, so it can happen while an enclosing
program is being traced (jit, grad, vmap): the timed programs are separate,
concrete computations.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import platform
import tempfile
import threading
import time
from typing import Callable, Mapping

import jaxlib

from echo_ode_jax.kernels.cpu import native

NATIVE, XLA = "native", "xla"
REPEATS = 3            # timed calls per implementation, after one warm-up call
MAX_SECONDS = 0.05     # fewer timed calls once one implementation took this long

_lock = threading.Lock()
_table: dict[str, str] | None = None     # "op key" -> NATIVE or XLA, this host's
_path: str | None = None                 # cache_path(), once per process
_warned: set[str] = set()                # warnings already logged (once each)


def cpu_model() -> str:
  """The CPU's model name (/proc/cpuinfo), else platform.processor() / machine()."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.lower().startswith(("model name", "hardware", "cpu model")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_threads() -> int:
  """Cores XLA:CPU can use in this process (1 with
  --xla_cpu_multi_thread_eigen=false in XLA_FLAGS, else the CPU affinity)."""
  if "--xla_cpu_multi_thread_eigen=false" in os.environ.get("XLA_FLAGS", ""):
    return 1
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:          # not Linux
    return os.cpu_count() or 1


def cache_key(model: str, threads: int, jaxlib_version: str, source: str) -> str:
  """16 hex digits naming the choices of one CPU model, core count, jaxlib
  version and kernel source (its hash)."""
  key = hashlib.sha256()
  for part in (model, str(threads), jaxlib_version, source, platform.machine()):
    key.update(part.encode() + b"\0")
  return key.hexdigest()[:16]


def cache_path() -> str:
  """The choices file of this host: <native cache dir>/choices_<cache_key>.json."""
  key = cache_key(cpu_model(), cpu_threads(), jaxlib.__version__, native.source_hash())
  return os.path.join(native.cache_dir(), f"choices_{key}.json")


def _warn_once(msg: str, *args) -> None:
  if msg not in _warned:
    _warned.add(msg)
    logging.warning(msg, *args)


def _read(path: str) -> dict[str, str]:
  try:
    with open(path, encoding="utf-8") as f:
      table = json.load(f)
  except FileNotFoundError:
    return {}
  except (OSError, ValueError) as e:
    _warn_once("kernels: ignoring the kernel choices in %s (%s)", path, e)
    return {}
  if not isinstance(table, dict):
    return {}
  return {k: v for k, v in table.items() if v in (NATIVE, XLA)}


def _write(path: str, table: Mapping[str, str]) -> None:
  """Merges `table` into the file (another process may have added choices) and
  replaces it atomically; an OSError is logged once and otherwise ignored."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    merged = {**_read(path), **table}
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=os.path.dirname(path))
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=0, sort_keys=True)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  except OSError as e:
    _warn_once("kernels: cannot save the kernel choices to %s (%s); they are measured again "
               "in the next process", path, e)


def measure(run: Callable[[], object], repeats: int = REPEATS,
            clock: Callable[[], float] = time.perf_counter) -> float:
  """Seconds of one call of `run` (which blocks until its result is ready):
  the fastest of `repeats` timed calls after a warm-up call (which compiles);
  a single timed call when that one took over MAX_SECONDS."""
  run()
  best = float("inf")
  for i in range(max(1, repeats)):
    t0 = clock()
    run()
    best = min(best, clock() - t0)
    if i == 0 and best > MAX_SECONDS:
      break
  return best


def pick(seconds: Mapping[str, float]) -> str:
  """NATIVE when it was strictly faster than XLA, else XLA."""
  return NATIVE if seconds[NATIVE] < seconds[XLA] else XLA


def choose(op: str, key: str, runs: Callable[[], Mapping[str, Callable[[], object]]],
           timer: Callable[[Callable[[], object]], float] | None = None) -> str:
  """NATIVE or XLA for operation `op` on operands described by `key`.

  runs: builds {NATIVE: fn, XLA: fn}, each computing the operation once on
  operands of that shape and blocking until done; called (in a helper thread,
  outside any enclosing trace) only when the choice is measured. ``ECHO_ODE_NATIVE=on`` / ``off`` answers without
  measuring; otherwise a choice already made on this host (in this process or
  saved in :func:`cache_path`) is reused, else both are timed with `timer`
  (default :func:`measure`).
  """
  timer = timer or measure
  m = native.mode()
  if m != "auto":
    return NATIVE if m == "on" else XLA
  global _table, _path
  name = f"{op} {key}"
  with _lock:
    if _table is None:
      _path = cache_path()
      _table = _read(_path)
    if name in _table:
      return _table[name]
    with concurrent.futures.ThreadPoolExecutor(1) as ex:   # outside any enclosing trace
      seconds = ex.submit(lambda: {k: timer(f) for k, f in runs().items()}).result()
    choice = pick(seconds)
    logging.info("kernels: %s %s: native %.3g ms, XLA %.3g ms -> %s", op, key,
                 seconds[NATIVE] * 1e3, seconds[XLA] * 1e3, choice)
    _table[name] = choice
    _write(_path, {name: choice})
    return choice


def reset() -> None:
  """Forgets the choices held in memory (the file is read again on next use)."""
  global _table
  with _lock:
    _table = None
