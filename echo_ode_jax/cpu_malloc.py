"""Alias of :mod:`echo_ode_jax.kernels.cpu.malloc` (the huge-page malloc restart)."""
import sys

from echo_ode_jax.kernels.cpu import malloc as _malloc

sys.modules[__name__] = _malloc
