"""Hand-written kernels: bilinear warp, Jacobian determinant, Gaussian smoothing, conv."""
from echo_ode_jax.kernels._conv import (IMPLS, conv2d, conv2d_up_concat, default_impl, upsample2,
                                         weight_grad_native, weight_grad_shifted,
                                         weight_grad_split, weight_grad_xla)
from echo_ode_jax.kernels._native import available as native_available
from echo_ode_jax.kernels._gaussian import gaussian_blur, gaussian_kernel1d
from echo_ode_jax.kernels._jacobian import (folding_fraction, jacobian_determinant,
                                            jdet_penalty)
from echo_ode_jax.kernels._norm_modulate import NORM_MODULATE_IMPLS, norm_modulate
from echo_ode_jax.kernels._reduce import (add, instance_norm, modulate, modulate_gain,
                                          sum_leading, sum_spatial, sum_to)
from echo_ode_jax.kernels._warp import (PADDINGS, hard_labels, identity_grid, one_hot,
                                        warp, warp_data, warp_labels)

__all__ = [
    "IMPLS", "PADDINGS", "add", "conv2d", "conv2d_up_concat", "default_impl", "folding_fraction",
    "gaussian_blur", "gaussian_kernel1d", "hard_labels", "identity_grid", "instance_norm",
    "jacobian_determinant", "jdet_penalty", "modulate", "modulate_gain", "native_available", "NORM_MODULATE_IMPLS", "norm_modulate",
    "one_hot", "sum_leading",
    "sum_spatial", "sum_to", "upsample2",
    "warp", "warp_data", "warp_labels", "weight_grad_native", "weight_grad_shifted",
    "weight_grad_split", "weight_grad_xla",
]
