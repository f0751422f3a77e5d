"""Errors for bad input: one line that names the file and the problem."""
from __future__ import annotations

import os


class InputError(ValueError):
  """Bad input data. ``str(err)`` is one line: "<file>: <problem>"."""

  def __init__(self, path: str | os.PathLike | None, problem: str):
    self.path = None if path is None else os.fspath(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}" if self.path else problem)


def run_cli(main_fn, huge_pages: bool = False):
  """Wraps an absl ``main`` so that InputError prints one line and exits 2.

  It also turns on JAX's persistent compilation cache
  (:func:`echo_ode_jax.jit_cache.enable`) before ``main`` compiles anything.
  huge_pages: first restart the process with glibc's huge-page malloc tunable
  (:func:`echo_ode_jax.cpu_malloc.reexec_with_huge_pages`), for the scripts
  that run XLA:CPU fits or training.
  """
  import sys

  def wrapped(argv):
    from echo_ode_jax import cpu_malloc, jit_cache
    if huge_pages:
      cpu_malloc.reexec_with_huge_pages()
    jit_cache.enable()
    try:
      return main_fn(argv)
    except InputError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped
