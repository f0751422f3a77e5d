"""Errors for bad input: one line that names the file and the problem."""
from __future__ import annotations

import os


class InputError(ValueError):
  """Bad input data. ``str(err)`` is one line: "<file>: <problem>"."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}" if self.path else problem)


class OutputError(Exception):
  """An output that cannot be written (a full disk, a read-only folder). ``str(err)``
  is one line: "<file>: <problem>". Not an InputError: skipping bad inputs
  (``--skip_bad``) does not skip it."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}" if self.path else problem)


def run_cli(main_fn, huge_pages: bool = False):
  """Wraps an absl ``main`` so that InputError and OutputError print one line and exit 2,
  and SIGTERM exits through Python's unwinding (exit status 143).

  It also turns on JAX's persistent compilation cache
  (:func:`echo_ode_jax.jit_cache.enable`) before ``main`` compiles anything.
  huge_pages: first restart the process with glibc's huge-page malloc tunable
  (:func:`echo_ode_jax.cpu_malloc.reexec_with_huge_pages`), for the scripts
  that run XLA:CPU fits or training.
  """
  import sys

  def wrapped(argv):
    import signal
    from echo_ode_jax import cpu_malloc, jit_cache
    if huge_pages:
      cpu_malloc.reexec_with_huge_pages()
    # A batch scheduler's SIGTERM exits like Ctrl-C: unwinding, so every
    # atomic write in progress removes its temporary file.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
      signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    jit_cache.enable()
    try:
      return main_fn(argv)
    except (InputError, OutputError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped
