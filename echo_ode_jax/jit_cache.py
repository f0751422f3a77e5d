"""JAX's persistent compilation cache for the command-line tools.

Every experiment script turns it on (through :func:`echo_ode_jax.cli.run_cli`),
so a rerun, a resumed batch job or the next row of an ablation loads the fit
programs from disk instead of compiling them again (BENCHMARKS.md, "Persistent
compilation cache").

The directory is ``$ECHO_ODE_JIT_CACHE`` if set, else
``~/.cache/echo_ode_jax/jit``; ``ECHO_ODE_JIT_CACHE=off`` (or empty) leaves the
cache off. A directory already given to JAX (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config``) is kept. Entries are keyed by the program, the compile options
and the jax/jaxlib version and device, so a stale entry is never used, and
XLA:CPU checks the host's CPU features before it loads one (on some Intel
hosts it then rejects every entry and recompiles: jax issue #38445). Delete
the directory to reclaim the space.
"""
from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "echo_ode_jax", "jit")


def enable(path: str | None = None) -> str | None:
  """Turns the persistent compilation cache on; returns its directory (None: off).

  path: the directory; None reads ``$ECHO_ODE_JIT_CACHE`` (default
  :data:`DEFAULT_DIR`); "" or "off" leaves the cache off. Call it before the
  first compile.
  """
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  if path is None:
    path = os.environ.get("ECHO_ODE_JIT_CACHE", DEFAULT_DIR)
  if not path or path == "off":
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  return path
