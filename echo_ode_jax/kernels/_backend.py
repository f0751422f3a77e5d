"""How each operation runs on this backend: the one place that decides.

:func:`conv2d` and :func:`norm_modulate` (the model's operations) ask
:func:`use_native` at trace time whether an operation on operands of a given
shape runs as a native CPU kernel (:mod:`.cpu.native`) or as XLA's own ops:
never off XLA:CPU, never when the kernels are not built or
``ECHO_ODE_NATIVE=off``, always (where the kernel supports the operands) with
``ECHO_ODE_NATIVE=on``, and otherwise whichever was faster on this host
(:mod:`.cpu.autotune`). :func:`compiler_options` are the XLA options every fit
program and every measurement compiles with.
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax

from echo_ode_jax.kernels.cpu import autotune, native
from echo_ode_jax.kernels.cpu.autotune import cpu_threads

# XLA:CPU's YNNPACK convolution fusions run on one thread, while its Eigen
# convolutions use the whole intra-op pool (BENCHMARKS.md, "YNNPACK").
_YNN_OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options() -> dict[str, str] | None:
  """XLA compile options of the fit programs on this backend: on a CPU process
  with more than one core (:func:`cpu_threads`), YNNPACK's fusions off (every
  convolution takes XLA's multi-threaded Eigen path; the same function up to
  float32 summation order); otherwise None (XLA's defaults)."""
  if jax.default_backend() == "cpu" and cpu_threads() > 1:
    return dict(_YNN_OFF)
  return None


def jit(fn, **kw):
  """jax.jit with :func:`compiler_options` (for the measured programs)."""
  return jax.jit(fn, compiler_options=compiler_options(), **kw)


def native_enabled() -> bool:
  """Whether native kernels may run here: the CPU backend and the kernels built
  (and not ``ECHO_ODE_NATIVE=off``)."""
  return jax.default_backend() == "cpu" and native.available()


def use_native(op: str, key: str,
               runs: Callable[[], Mapping[str, Callable[[], object]]]) -> bool:
  """Whether operation `op` on operands described by `key` (the caller checked
  that the native kernel supports them) runs natively; `runs` builds the two
  candidates for :func:`autotune.choose`."""
  return native_enabled() and autotune.choose(op, key, runs) == autotune.NATIVE


forced = native.forced   # forced("off"): XLA's ops only, for programs traced in the block
