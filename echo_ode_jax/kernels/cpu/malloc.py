"""Huge pages for XLA:CPU's buffers, kept for reuse: glibc malloc tunables.

XLA:CPU allocates each step's temporaries afresh, some of them hundreds of MB.
With glibc's malloc, a buffer that large is a fresh mmap (a worker thread's
arena cannot hold it, and glibc caps its mmap threshold at 32 MB), unmapped
again when freed, so each step faults its pages back in 4 KiB at a time and
spends much of its CPU time in the kernel (`benchmarks/fit_speed.py` reports
the faults and the kernel time; BENCHMARKS.md, "Malloc").

The restart sets :data:`TUNABLE` (glibc >= 2.35):
  * glibc.malloc.hugetlb=1: malloc asks the kernel for transparent huge
    pages, 2 MiB per fault (:data:`HUGETLB`);
  * glibc.malloc.arena_max=1, mmap_max=0 and a trim threshold of 1 TiB: every
    thread allocates from the main heap, large buffers included, and freed
    memory stays mapped, so the next step reuses the pages it already faulted
    in (no faults and almost no kernel time per step after the first). The
    process keeps its peak heap mapped (a higher peak RSS).
    `benchmarks/malloc_ab.py` compares them (BENCHMARKS.md, "Malloc").
The computed results do not change.

glibc reads its tunables once, when the process starts, so a running Python
cannot turn this on for itself; :func:`reexec_with_huge_pages` restarts the
process with GLIBC_TUNABLES set. The `experiments/` scripts call it first thing
(`cli.run_cli`). For your own programs set it in the shell (the value of
:data:`TUNABLE`):

    GLIBC_TUNABLES=glibc.malloc.hugetlb=1:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1099511627776 python my_fit.py

(a fit on XLA:CPU logs this once, :func:`hint`, when the process would benefit).
Opt out with ECHO_ODE_MALLOC=default. Nothing happens off Linux, on another
libc or glibc < 2.35, when transparent huge pages are off ("never"), when
LD_PRELOAD is set (another malloc may be preloaded, e.g. tcmalloc, which keeps
freed memory mapped and needs none of this; set
TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD=100000000000 with it, or it reports every
allocation over 1 GB), or when GLIBC_TUNABLES already sets glibc.malloc.hugetlb.
Other tunables the user set keep their values (ours are added only for keys
not already there).
"""
from __future__ import annotations

import functools
import os
import platform
import sys
from typing import Mapping

OPT_OUT = "ECHO_ODE_MALLOC"          # "default": leave malloc as the process started with it
HUGETLB = "glibc.malloc.hugetlb=1"
# Huge pages, and freed memory kept for reuse: one arena (a worker thread's
# arena would mmap every large buffer anew), no mmap for large requests, and
# no trimming of the heap's free top (benchmarks/malloc_ab.py, variant glibc_keep).
TUNABLE = (f"{HUGETLB}:glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
           "glibc.malloc.trim_threshold=1099511627776")
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"
MALLOC_ENV = ("LD_PRELOAD", "GLIBC_TUNABLES")   # the variables that choose or tune the malloc


@functools.lru_cache(maxsize=None)
def _thp_mode() -> str | None:
  """The kernel's transparent huge page mode ("always", "madvise", "never"), or None."""
  try:
    with open(_THP) as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


@functools.lru_cache(maxsize=None)
def _glibc_version() -> tuple[int, int] | None:
  lib, ver = platform.libc_ver()
  if lib != "glibc":
    return None
  try:
    major, minor = ver.split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None


def tuned_env(environ: Mapping[str, str], *, system: str | None = None,
              glibc: tuple[int, int] | None = ..., thp: str | None = ...
              ) -> dict[str, str] | None:
  """The environment to restart with, or None when there is nothing to do.

  system, glibc and thp default to this machine's (sys.platform, the glibc
  version, the transparent huge page mode); tests pass their own.
  """
  system = sys.platform if system is None else system
  glibc = _glibc_version() if glibc is ... else glibc
  thp = _thp_mode() if thp is ... else thp
  if system != "linux" or environ.get(OPT_OUT, "") == "default":
    return None
  if glibc is None or glibc < (2, 35) or thp not in ("always", "madvise"):
    return None
  tunables = environ.get("GLIBC_TUNABLES", "")
  if environ.get("LD_PRELOAD") or "glibc.malloc.hugetlb" in tunables:
    return None
  env = dict(environ)
  have = {t.split("=", 1)[0] for t in tunables.split(":") if t}
  ours = [t for t in TUNABLE.split(":") if t.split("=", 1)[0] not in have]
  env["GLIBC_TUNABLES"] = ":".join(([tunables] if tunables else []) + ours)
  return env


def describe(environ: Mapping[str, str] | None = None) -> str:
  """The malloc a process runs with: its MALLOC_ENV settings, or "glibc defaults"."""
  environ = os.environ if environ is None else environ
  return " ".join(f"{k}={environ[k]}" for k in MALLOC_ENV if environ.get(k)) or "glibc defaults"


_hinted = False


def hint(environ: Mapping[str, str] | None = None, backend: str | None = None,
         **machine) -> str | None:
  """Logs, once per process, how to start Python with the tunable, when a fit
  runs on XLA:CPU in a process that :func:`reexec_with_huge_pages` would restart
  (a notebook, or your own script). Returns the message, or None (nothing
  logged: already said, another backend, or nothing to do). `machine` is
  :func:`tuned_env`'s system/glibc/thp, for tests.
  """
  global _hinted
  if _hinted:
    return None
  if backend is None:
    import jax
    backend = jax.default_backend()
  if backend != "cpu" or tuned_env(os.environ if environ is None else environ,
                                   **machine) is None:
    return None
  _hinted = True
  msg = (f"XLA:CPU's fit steps fault their large buffers in 4 KiB at a time under glibc's "
         f"default malloc; start Python with GLIBC_TUNABLES={TUNABLE} for faster "
         f"steps (echo_ode_jax.cpu_malloc; {OPT_OUT}=default silences this)")
  from absl import logging
  logging.warning(msg)
  return msg


def reexec_with_huge_pages() -> None:
  """Restarts this process (same interpreter and arguments) with GLIBC_TUNABLES
  set to use huge pages, when :func:`tuned_env` says so; otherwise returns.

  Call it before the program allocates anything large (the restart discards
  the process). After the restart the tunable is set, so it returns at once.
  """
  env = tuned_env(os.environ)
  if env is None:
    return
  print(f"echo_ode_jax: restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (huge pages "
        f"for XLA:CPU's buffers, kept for reuse; {OPT_OUT}=default skips this)",
        file=sys.stderr, flush=True)
  sys.stdout.flush()
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
  os.execve(sys.executable, argv, env)
