"""The process setup every experiment script runs under: `run_cli` / `main`.

* InputError and OutputError print one line ("error: <file>: <problem>") and
  exit with status 2; so does a ``--config.KEY`` that names no config field;
* SIGTERM exits through Python's unwinding (status 143), so every atomic write
  in progress removes its temporary file;
* JAX's persistent compilation cache (:func:`echo_ode_jax.jit_cache.enable`) is
  on before ``main`` compiles anything;
* huge_pages: the process first restarts itself with glibc's huge-page malloc
  tunable (:func:`echo_ode_jax.cpu_malloc.reexec_with_huge_pages`), for the
  scripts that run XLA:CPU fits or training.
"""
from __future__ import annotations

import re
import signal
import sys

from absl import app

from echo_ode_jax import cpu_malloc, jit_cache
from echo_ode_jax.errors import InputError, OutputError


def run_cli(main_fn, huge_pages: bool = False):
  """Wraps an absl ``main`` (module docstring)."""

  def wrapped(argv):
    if huge_pages:
      cpu_malloc.reexec_with_huge_pages()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
      signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    jit_cache.enable()
    try:
      return main_fn(argv)
    except (InputError, OutputError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)

  return wrapped


def exit_unknown_config_field(err: Exception, argv: list[str]) -> None:
  """Prints "error: --config.KEY: no such config field" for ml_collections'
  AttributeError / KeyError about an override of a field the config lacks, and
  exits with status 2 (absl would print a traceback)."""
  names = re.findall(r"'(\w+)'", str(err))
  given = [a.split("=", 1)[0] for a in argv[1:] if re.match(r"--\w+\.", a)]
  bad = [g for g in given if names and g.rsplit(".", 1)[-1] == names[0]]
  print(f"error: {bad[0] if bad else ', '.join(given) or '--config'}: no such config field",
        file=sys.stderr)
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with an unknown ``--config.KEY`` as a one-line error."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    exit_unknown_config_field(e, argv)


def main(main_fn, huge_pages: bool = False) -> None:
  """``app.run`` of `main_fn` under :func:`run_cli`, flags parsed by :func:`parse_flags`."""
  app.run(run_cli(main_fn, huge_pages), flags_parser=parse_flags)
