"""The operations the model and the losses are written in: bilinear warp, Jacobian
determinant, Gaussian smoothing, conv, SPADE's normalisation and the row-first
sums. How each runs on this backend (native CPU kernel or XLA's op) is decided
in :mod:`._backend`."""
from echo_ode_jax.kernels._backend import compiler_options, cpu_threads, forced
from echo_ode_jax.kernels._conv import conv2d, conv2d_up_concat, upsample2, weight_grad_xla
from echo_ode_jax.kernels._gaussian import gaussian_blur, gaussian_kernel1d
from echo_ode_jax.kernels._jacobian import (folding_fraction, jacobian_determinant,
                                            jdet_penalty)
from echo_ode_jax.kernels._norm_modulate import norm_modulate
from echo_ode_jax.kernels._reduce import (add, instance_norm, modulate, modulate_gain,
                                          sum_leading, sum_spatial, sum_to)
from echo_ode_jax.kernels._warp import (PADDINGS, hard_labels, identity_grid, one_hot,
                                        warp, warp_data, warp_labels)
from echo_ode_jax.kernels.cpu.native import available as native_available

__all__ = [
    "PADDINGS", "add", "compiler_options", "conv2d", "conv2d_up_concat", "cpu_threads",
    "folding_fraction", "forced", "gaussian_blur", "gaussian_kernel1d", "hard_labels",
    "identity_grid", "instance_norm", "jacobian_determinant", "jdet_penalty", "modulate",
    "modulate_gain", "native_available", "norm_modulate", "one_hot", "sum_leading",
    "sum_spatial", "sum_to", "upsample2", "warp", "warp_data", "warp_labels", "weight_grad_xla",
]
