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

from echo_ode_jax.kernels import (add, conv2d, conv2d_up_concat, forced, instance_norm,
                                  modulate_gain, norm_modulate, upsample2)


SPADE_TIME = ("hidden", "gain")   # ModelConfig.spade_time choices
# Fields earlier versions had, about how the network was computed (not which
# function): ignored when a saved config is read (ModelConfig.from_dict).
REMOVED_FIELDS = frozenset({"conv_impl", "subpixel_up", "split_gamma_beta", "row_sums",
                            "fused_norm"})


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

  def __post_init__(self):
    if self.spade_time not in SPADE_TIME:
      raise ValueError(f"ModelConfig.spade_time must be one of {', '.join(SPADE_TIME)}, "
                       f"got {self.spade_time!r}")

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  @classmethod
  def from_dict(cls, d: dict) -> "ModelConfig":
    """A ModelConfig from its JSON dict (lists as tuples); REMOVED_FIELDS are ignored."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()
                  if k not in REMOVED_FIELDS})


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


def _resize_nearest(x, shape_hw):
  """Nearest-neighbour resize of (..., H, W, C) to (h, w) by strided sampling.

  Output pixel i takes input pixel floor(i * H / h) (aligned on the first
  pixel), not the pixel-centre rule floor((i + 0.5) * H / h) of
  :func:`echo_ode_jax.data.resample.nearest_index`: the two differ by up to one
  input pixel (e.g. H = 2h picks pixels 0, 2, 4, ... here and 1, 3, 5, ...
  there). The trained and fitted models, and the PyTorch peer
  (benchmarks/peer_torch.py), are defined with this rule; a jnp function
  because it runs inside jit.
  """
  h, w = x.shape[-3:-1]
  th, tw = shape_hw
  if (h, w) == (th, tw):
    return x
  ri = (jnp.arange(th) * h) // th
  ci = (jnp.arange(tw) * w) // tw
  return x[..., ri, :, :][..., ci, :]


class Conv(nn.Module):
  """A 3x3 (or kh x kw) SAME convolution + bias over :func:`kernels.conv2d`.

  Same parameters ("kernel" HWIO, "bias") and initialisers as flax.linen.Conv.
  """
  features: int
  kernel_size: tuple[int, int] = (3, 3)
  strides: tuple[int, int] = (1, 1)
  dtype: jnp.dtype = jnp.float32
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
    return add(y, bias.astype(self.dtype)) if self.add_bias else y

  @nn.compact
  def __call__(self, x):
    kernel, bias = self._params(x.shape[-1])
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, "SAME")
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
                         kernel.astype(self.dtype))
    return self._add_bias(y, bias)


class _RawConv(Conv):
  """Conv's parameters; returns (the conv without its bias, the bias)."""

  @nn.compact
  def __call__(self, x):
    kernel, bias = self._params(x.shape[-1])
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
                  "SAME"), bias


class SpadeTime(nn.Module):
  """leaky_relu(norm(f) (1 + gamma) + beta): one decoder map f (K, h, w, C)
  normalised per knot and channel (parameter-free instance norm, as SPADE),
  modulated by gamma, beta from m_0 (shared) and PE(t) (per knot), activated.

  time="hidden": (gamma, beta) = gamma_beta(relu(shared(m_0) + time(PE(t)))),
  one conv per knot. time="gain": gamma_beta(relu(shared(m_0))) once, times
  1 + time(PE(t)) per knot and channel (time has 2C outputs: gamma's gains,
  then beta's). Without PE(t) (pe None) both are gamma_beta(relu(shared(m_0))).
  """
  channels: int
  hidden: int
  dtype: jnp.dtype = jnp.float32
  time: str = "hidden"

  @nn.compact
  def __call__(self, f, m0_n, pe):
    # m0_n: (h, w, classes) shared; pe: (K, pe_dim) or None; f: (K, h, w, C).
    c = self.channels
    hid = Conv(self.hidden, dtype=self.dtype, name="shared")(m0_n[None])
    if pe is not None and self.time == "hidden":
      hid = add(hid, nn.Dense(self.hidden, dtype=self.dtype, name="time")(pe)[:, None, None, :])
    hid = nn.relu(hid)
    gb, gb_bias = _RawConv(2 * c, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                           name="gamma_beta")(hid)
    if pe is not None and self.time == "gain":
      gain = 1.0 + nn.Dense(2 * c, dtype=self.dtype, name="time")(pe)  # (K, 2C)
      gb = add(gb, gb_bias.astype(self.dtype))
      return modulate_gain(instance_norm(f, 1e-5), gb[..., :c], gb[..., c:], gain[:, :c],
                           gain[:, c:], LEAKY_SLOPE)
    return norm_modulate(f, gb, gb_bias.astype(self.dtype), LEAKY_SLOPE, 1e-5)


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

    conv = functools.partial(Conv, dtype=dtype)

    # Encoder: strided convs; keep the input and every level for the skips.
    skips = [x]
    for i, ch in enumerate(cfg.enc_channels):
      x = act(conv(ch, strides=(2, 2), name=f"enc{i}")(x))
      skips.append(x)
    if cfg.use_pe:
      x = add(x, nn.Dense(x.shape[-1], dtype=dtype, name="pe_proj")(pe)[:, None, None, :])

    # Decoder.
    m0 = m0.astype(dtype)
    n_up = len(cfg.enc_channels)
    skip = None       # set: x is still to be upsampled and concatenated with it
    # A decoder conv followed by SPADE's instance norm leaves its bias out (the
    # norm cancels it; the parameter stays).
    add_bias = not cfg.use_spade
    for i, ch in enumerate(cfg.dec_channels):
      if skip is None:
        x = conv(ch, add_bias=add_bias, name=f"dec{i}")(x)
      else:
        x = UpConcatConv(ch, dtype=dtype, add_bias=add_bias, name=f"dec{i}")(x, skip)
        skip = None
      if cfg.use_spade:
        m0_n = _resize_nearest(m0, x.shape[1:3])
        x = SpadeTime(ch, cfg.spade_hidden, dtype=dtype, time=cfg.spade_time,
                      name=f"spade{i}")(x, m0_n, pe if cfg.use_pe else None)   # activated
      else:
        x = act(x)
      if i < n_up:
        skip = skips[n_up - 1 - i]
        if i + 1 == len(cfg.dec_channels):
          x = jnp.concatenate([upsample2(x, skip.shape[1:3]), skip], axis=-1)
          skip = None
    v = conv(2, kernel_init=nn.initializers.zeros, name="flow")(x)
    del k
    return (v.astype(jnp.float32) * cfg.velocity_scale)


@functools.lru_cache(maxsize=32)
def _init_fn(config: ModelConfig, shape_hw: tuple[int, int]):
  """jit: key -> params, one compile per config and size, without XLA's backend
  optimisations (the program runs once; its optimised compile takes longer)."""
  h, w = shape_hw
  dummy = (jnp.zeros((1, h, w, 1)), jnp.zeros((h, w, config.num_classes)), jnp.zeros((1,)),
           jnp.zeros((h, w, 1)))
  return jax.jit(lambda key: VelocityUNet(config).init(key, *dummy)["params"],
                 compiler_options={"xla_backend_optimization_level": 0})


def init_params(config: ModelConfig, key, shape_hw: Seq[int]):
  """Parameters for images of size shape_hw (traced with XLA's ops only: the
  forward pass only gives the shapes)."""
  with forced("off"):
    return _init_fn(config, tuple(int(s) for s in shape_hw))(key)


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
