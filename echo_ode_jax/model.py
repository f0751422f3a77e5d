"""The velocity network V_theta(I_t, m_0, t) (paper section IV-A), flax.linen.

A VoxelMorph-style U-Net: an encoder of strided 3x3 convs (channels [16, 32, 32,
32]), a decoder of 3x3 convs (channels [32, 32, 32, 32, 32, 16, 16]) whose first
four layers are followed by a x2 upsampling and a skip concatenation, and a final
3x3 conv to 2 channels: the velocity in pixels per unit time, (row, col) order.

Conditioning (each switchable for ablations):
  * PE: a sinusoidal (Transformer) encoding of t, projected and added to the
    latent (bottleneck) features;
  * SPADE with time: every decoder feature map f_n is normalised (parameter-free
    instance norm, as in SPADE) and modulated as
    f_n <- (1 + gamma_n) * norm(f_n) + beta_n, with gamma_n, beta_n predicted by
    a small conv net from m_0 (one-hot, resized to f_n) plus a projection of
    PE(t). Writing the scale as 1 + gamma_n keeps the same function class as the
    paper's gamma_n * f_n and makes the zero-initialised modulation the identity.
    Without the normalisation the modulation compounds over the seven decoder
    layers and Adam at lr 0.01 diverges within a few steps.
    How PE(t) enters (``spade_time``; the paper does not say):
      - "hidden" (default): added to SPADE's hidden layer before its ReLU, so
        the gamma_beta conv runs once per knot;
      - "gain": gamma_n, beta_n = G_n(m_0) (1 + a_n(t)), B_n(m_0) (1 + b_n(t))
        with per-channel a_n, b_n projected from PE(t); the conv maps G_n, B_n
        are computed once per sequence, not once per knot (a cheaper function
        class: time rescales m_0's modulation, e.g. fades it late in the cycle).

The last layer is initialised with zero weights, so the initial velocity is 0
and phi starts at the identity.

The network is applied to a batch of K knot times at once: images (K, H, W, 1),
t (K,), and one m_0 (H, W, num_classes) shared by all of them; the parts that
depend only on m_0 are computed once, not K times.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence as Seq

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from echo_ode_jax.kernels import (add, conv2d, conv2d_up_concat, instance_norm, modulate,
                                  modulate_gain, norm_modulate, upsample2)


SPADE_TIME = ("hidden", "gain")   # ModelConfig.spade_time choices
SPLIT_GAMMA_BETA_MIN = 32   # split_gamma_beta applies to decoder maps of this many channels or more


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  enc_channels: tuple[int, ...] = (16, 32, 32, 32)
  dec_channels: tuple[int, ...] = (32, 32, 32, 32, 32, 16, 16)
  num_classes: int = 4          # one-hot classes of m_0
  use_pe: bool = True           # time positional encoding added in the latent space
  use_spade: bool = True        # temporal SPADE on every decoder feature map
  pe_dim: int = 32              # size of PE(t)
  spade_hidden: int = 16        # channels of the SPADE hidden layer
  spade_time: str = "hidden"    # how PE(t) enters SPADE: "hidden" or "gain" (module docstring)
  input_i0: bool = False        # also feed I_0 (not in the paper; for ablations)
  velocity_scale: float = 1.0   # output multiplier (pixels per unit time)
  compute_dtype: str = "float32"  # "bfloat16" runs the convs in bf16
  conv_impl: str | None = None  # kernels.conv2d impl: "native", "split", "shifted", "xla"; None: per backend
  subpixel_up: bool = True      # decoder upsample+concat+conv as kernels.conv2d_up_concat (same
                                # function and parameters; False materialises both maps)
  split_gamma_beta: bool = True  # SPADE gamma and beta (C >= 32 each) as two convs on the
                                 # halves of the one gamma_beta kernel (faster on XLA:CPU);
                                 # ignored where fused_norm applies (one conv feeds the kernel)
  row_sums: bool = True         # biases, broadcasts, instance norm and SPADE's modulation with
                                # the VJPs of kernels.add / instance_norm / modulate(_gain)
                                # (same function; faster on XLA:CPU)
  fused_norm: bool = True       # with conv_impl "native", float32, use_pe, row_sums and
                                # spade_time "hidden": SPADE's gamma_beta bias, instance norm,
                                # modulation and activation as the one native kernel
                                # kernels.norm_modulate, and each decoder conv's bias left out
                                # (the instance norm after it cancels it): the same function

  def __post_init__(self):
    if self.spade_time not in SPADE_TIME:
      raise ValueError(f"ModelConfig.spade_time must be one of {', '.join(SPADE_TIME)}, "
                       f"got {self.spade_time!r}")

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)


def positional_encoding(t: Float[Array, "K"], dim: int, max_period: float = 1e4
                        ) -> Float[Array, "K dim"]:
  """Transformer sinusoidal encoding of t in [0, 1] (scaled to [0, 1000]).

  PE[k, i] = sin(1000 t_k / P^(i / (dim/2))) and PE[k, dim/2 + i] = cos(...)
  for i < dim/2, P = max_period.
  """
  if dim < 2 or dim % 2:
    raise ValueError(f"positional_encoding: dim must be even and >= 2, got {dim}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  ang = (1000.0 * t)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


LEAKY_SLOPE = 0.2   # the U-Net's activation: leaky ReLU


def _leaky_relu(x):
  return nn.leaky_relu(x, LEAKY_SLOPE)


def _adder(row_sums: bool):
  """The broadcast add of the model: kernels.add (row-first gradient sums) or jnp.add."""
  return add if row_sums else jnp.add


def _resize_nearest(x, shape_hw):
  """Nearest-neighbour resize of (..., H, W, C) to (h, w) by strided sampling."""
  h, w = x.shape[-3:-1]
  th, tw = shape_hw
  if (h, w) == (th, tw):
    return x
  ri = (jnp.arange(th) * h) // th
  ci = (jnp.arange(tw) * w) // tw
  return x[..., ri, :, :][..., ci, :]


class Conv(nn.Module):
  """A 3x3 (or kh x kw) SAME convolution + bias over :func:`kernels.conv2d`.

  Same parameters ("kernel" HWIO, "bias") and initialisers as flax.linen.Conv;
  the convolution's VJP is chosen by `impl` (see kernels.conv2d).
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  dtype: jnp.dtype = jnp.float32
  impl: str | None = None
  row_sums: bool = True         # bias added by kernels.add (its gradient as a row-first sum)
  kernel_init: object = nn.initializers.lecun_normal()
  bias_init: object = nn.initializers.zeros
  add_bias: bool = True         # False: the "bias" parameter exists but is not added (for a
                                # conv followed by an instance norm, which cancels it)

  def _params(self, in_channels: int):
    """("kernel" (kh, kw, in_channels, features), "bias" (features,)), float32."""
    kernel = self.param("kernel", self.kernel_init,
                        tuple(self.kernel_size) + (in_channels, self.features), jnp.float32)
    return kernel, self.param("bias", self.bias_init, (self.features,), jnp.float32)

  def _add_bias(self, y, bias):
    if not self.add_bias:
      return y
    return _adder(self.row_sums)(y, bias.astype(self.dtype))

  @nn.compact
  def __call__(self, x):
    kernel, bias = self._params(x.shape[-1])
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, "SAME",
               impl=self.impl)
    return self._add_bias(y, bias)


class UpConcatConv(Conv):
  """Conv(concat([x2 nearest upsampling of x, skip])) with Conv's parameters.

  Computed by :func:`kernels.conv2d_up_concat` (the upsampled map and the
  concatenation are never materialised); kernel_size must be 3x3, strides 1.
  """

  @nn.compact
  def __call__(self, x, skip):
    kernel, bias = self._params(x.shape[-1] + skip.shape[-1])
    y = conv2d_up_concat(x.astype(self.dtype), skip.astype(self.dtype),
                         kernel.astype(self.dtype), impl=self.impl)
    return self._add_bias(y, bias)


class _TwoHalvesConv(Conv):
  """Conv's parameters; returns its output's two channel halves, each its own conv."""

  @nn.compact
  def __call__(self, x):
    kernel, bias = self._params(x.shape[-1])
    half = self.features // 2
    x = x.astype(self.dtype)
    return tuple(self._add_bias(conv2d(x, kernel[..., sl].astype(self.dtype), self.strides,
                                       "SAME", impl=self.impl), bias[sl])
                 for sl in (slice(None, half), slice(half, None)))


class _RawConv(Conv):
  """Conv's parameters; returns (the conv without its bias, the bias)."""

  @nn.compact
  def __call__(self, x):
    kernel, bias = self._params(x.shape[-1])
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, "SAME",
                  impl=self.impl), bias


class SpadeTime(nn.Module):
  """leaky_relu(norm(f) (1 + gamma) + beta): one decoder map modulated by
  gamma, beta from m_0 (shared) and PE(t) (per knot), then activated.

  time="hidden": gamma_beta(relu(shared(m_0) + time(PE(t)))), one conv per knot.
  time="gain": gamma_beta(relu(shared(m_0))) once, times 1 + time(PE(t)) per
  knot and channel (time has 2C outputs: gamma's gains, then beta's).
  fused (time="hidden" with PE(t)): gamma_beta's output without its bias and
  the bias go to kernels.norm_modulate (native), which adds the bias,
  normalises, modulates and activates in one op.
  """
  channels: int
  hidden: int
  dtype: jnp.dtype = jnp.float32
  impl: str | None = None
  split_gamma_beta: bool = True
  row_sums: bool = True
  time: str = "hidden"
  fused: bool = False

  @nn.compact
  def __call__(self, f, m0_n, pe):
    # m0_n: (h, w, classes) shared; pe: (K, pe_dim) or None; f: (K, h, w, C).
    plus = _adder(self.row_sums)
    conv = functools.partial(Conv, dtype=self.dtype, impl=self.impl, row_sums=self.row_sums)
    hid = conv(self.hidden, name="shared")(m0_n[None])
    if pe is not None and self.time == "hidden":
      hid = plus(hid, nn.Dense(self.hidden, dtype=self.dtype, name="time")(pe)[:, None, None, :])
    hid = nn.relu(hid)
    if self.fused:
      if self.time != "hidden" or pe is None:
        raise ValueError("SpadeTime: fused needs time='hidden' and PE(t)")
      gb, gb_bias = _RawConv(2 * self.channels, dtype=self.dtype, impl=self.impl,
                             kernel_init=nn.initializers.zeros, name="gamma_beta")(hid)
      return norm_modulate(f, gb, gb_bias, LEAKY_SLOPE, 1e-5, impl="native")
    # gamma and beta: one "gamma_beta" conv of 2C outputs, computed as one conv
    # or (split_gamma_beta, C >= SPLIT_GAMMA_BETA_MIN) as two convs on its
    # kernel's halves. On XLA:CPU two convs of 32 outputs beat one of 64 (the
    # 128^2 step by 7.5%, step_profile.py --grid, in BENCHMARKS.md); splitting
    # the C = 16 maps too changed the step by under 1%, so they stay one conv.
    if self.split_gamma_beta and self.channels >= SPLIT_GAMMA_BETA_MIN:
      gamma, beta = _TwoHalvesConv(2 * self.channels, dtype=self.dtype, impl=self.impl,
                                   row_sums=self.row_sums, kernel_init=nn.initializers.zeros,
                                   name="gamma_beta")(hid)
    else:
      gb = conv(2 * self.channels, kernel_init=nn.initializers.zeros, name="gamma_beta")(hid)
      gamma, beta = jnp.split(gb, 2, axis=-1)
    # Parameter-free instance normalisation (per knot, per channel), as SPADE.
    if self.row_sums:
      f = instance_norm(f, 1e-5)
    else:
      mean = jnp.mean(f, axis=(1, 2), keepdims=True)
      var = jnp.var(f, axis=(1, 2), keepdims=True)
      f = (f - mean) * jax.lax.rsqrt(var + 1e-5)
    if pe is not None and self.time == "gain":
      gain = 1.0 + nn.Dense(2 * self.channels, dtype=self.dtype, name="time")(pe)  # (K, 2C)
      s_g, s_b = gain[:, :self.channels], gain[:, self.channels:]
      if self.row_sums:
        return modulate_gain(f, gamma, beta, s_g, s_b, LEAKY_SLOPE)
      gamma, beta = gamma * s_g[:, None, None, :], beta * s_b[:, None, None, :]
    if self.row_sums:
      return modulate(f, gamma, beta, LEAKY_SLOPE)
    return _leaky_relu(f * (1.0 + gamma) + beta)


def fused_norm(cfg: ModelConfig) -> bool:
  """Whether the network runs SPADE as kernels.norm_modulate's native kernel
  (ModelConfig.fused_norm and the settings it needs)."""
  return (cfg.fused_norm and cfg.use_spade and cfg.use_pe and cfg.spade_time == "hidden"
          and cfg.row_sums and cfg.conv_impl == "native" and cfg.compute_dtype == "float32")


class VelocityUNet(nn.Module):
  """V_theta(I_t, m_0, t) -> (K, H, W, 2) velocity in pixels per unit time."""
  config: ModelConfig = ModelConfig()

  @nn.compact
  def __call__(self, images: Float[Array, "K H W 1"], m0: Float[Array, "H W C"],
               t: Float[Array, "K"], i0: Float[Array, "H W 1"] | None = None
               ) -> Float[Array, "K H W 2"]:
    cfg = self.config
    dtype = jnp.dtype(cfg.compute_dtype)
    act = _leaky_relu
    k = images.shape[0]
    x = images.astype(dtype)
    if cfg.input_i0:
      x = jnp.concatenate([x, jnp.broadcast_to(i0.astype(dtype), x.shape)], axis=-1)
    pe = positional_encoding(t, cfg.pe_dim).astype(dtype) if (cfg.use_pe or cfg.use_spade) \
        else None

    conv = functools.partial(Conv, dtype=dtype, impl=cfg.conv_impl, row_sums=cfg.row_sums)
    plus = _adder(cfg.row_sums)
    fused = fused_norm(cfg)

    # Encoder: strided convs; keep the input and every level for the skips.
    skips = [x]
    for i, ch in enumerate(cfg.enc_channels):
      x = act(conv(ch, strides=(2, 2), name=f"enc{i}")(x))
      skips.append(x)
    if cfg.use_pe:
      x = plus(x, nn.Dense(x.shape[-1], dtype=dtype, name="pe_proj")(pe)[:, None, None, :])

    # Decoder.
    m0 = m0.astype(dtype)
    n_up = len(cfg.enc_channels)
    skip = None       # set: x is still to be upsampled and concatenated with it
    for i, ch in enumerate(cfg.dec_channels):
      if skip is None:
        x = conv(ch, add_bias=not fused, name=f"dec{i}")(x)
      else:
        x = UpConcatConv(ch, dtype=dtype, impl=cfg.conv_impl, row_sums=cfg.row_sums,
                         add_bias=not fused, name=f"dec{i}")(x, skip)
        skip = None
      if cfg.use_spade:
        m0_n = _resize_nearest(m0, x.shape[1:3])
        x = SpadeTime(ch, cfg.spade_hidden, dtype=dtype, impl=cfg.conv_impl,
                      split_gamma_beta=cfg.split_gamma_beta, row_sums=cfg.row_sums,
                      time=cfg.spade_time, fused=fused, name=f"spade{i}")(
            x, m0_n, pe if cfg.use_pe else None)      # activated
      else:
        x = act(x)
      if i < n_up:
        skip = skips[n_up - 1 - i]
        if not cfg.subpixel_up or i + 1 == len(cfg.dec_channels):
          x = jnp.concatenate([upsample2(x, skip.shape[1:3]), skip], axis=-1)
          skip = None
    v = conv(2, kernel_init=nn.initializers.zeros, name="flow")(x)
    del k
    return (v.astype(jnp.float32) * cfg.velocity_scale)


@functools.lru_cache(maxsize=32)
def _init_fn(config: ModelConfig, shape_hw: tuple[int, int]):
  """jit: key -> params, one compile per config and size.

  Compiled without XLA's backend optimisations: the program runs once, and on
  CPU the optimised compile of ~30 threefry draws takes ~3x longer (10 s).
  """
  h, w = shape_hw
  dummy = (jnp.zeros((1, h, w, 1)), jnp.zeros((h, w, config.num_classes)), jnp.zeros((1,)),
           jnp.zeros((h, w, 1)))
  return jax.jit(lambda key: VelocityUNet(config).init(key, *dummy)["params"],
                 compiler_options={"xla_backend_optimization_level": 0})


def init_params(config: ModelConfig, key, shape_hw: Seq[int]):
  """Parameters for images of size shape_hw."""
  return _init_fn(config, tuple(int(s) for s in shape_hw))(key)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
