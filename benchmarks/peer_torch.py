"""PyTorch (CPU) reference of the Echo-ODE fit step, for benchmarking only.

torch is not a dependency of the project. To run this file:

  python -m venv --system-site-packages .venv-bench
  .venv-bench/bin/pip install torch==2.13.0 torchdiffeq
  .venv-bench/bin/python benchmarks/peer_torch.py --size=128 --frames=20 --batch=1 \
      --steps=10 --formulation=batched

It prints the median seconds per step (one Adam step of every sequence).

The step is the one of :func:`echo_ode_jax.fit.make_step` (Euler solver only):

  * :class:`TorchVelocityUNet` is :class:`echo_ode_jax.model.VelocityUNet` in NCHW:
    the same layers, flax "SAME" padding (stride-2 convs pad (0, 1) on even
    sizes), nearest x2 upsampling + crop + concat [up, skip], SPADE with a
    parameter-free instance norm, PE, leaky ReLU 0.2. :func:`params_from_flax`
    copies a flax parameter tree into it, so both start from the same weights.
  * formulation "batched" (the project's default): the network at all knot
    times in one call, then Euler steps of phi sampling the velocity knots at
    phi (F.grid_sample, border padding, align_corners=True); phi at the frame
    times is interpolated linearly within the Euler step that contains them
    (diffrax's Euler dense output).
  * formulation "odeint": the network inside a torchdiffeq
    ``odeint(method="euler", options=dict(step_size=dt))`` vector field, the image
    at time t linearly interpolated between frames (``fit.frames_at``); the
    JAX counterpart is ``losses.loss_fn(..., formulation="inloop")``.
  * the loss is :func:`echo_ode_jax.losses.loss_terms` (sim, seg, ef, jdet, smt)
    weighted with the FitConfig lambdas; the optimiser is fit._optimizer's:
    Adam(cfg.lr) with optax's defaults, the gradient clipped to cfg.clip_norm,
    the cosine lr decay (keep_best is not mirrored).

Conventions as in the library: phi (T, H, W, 2) absolute pixel positions in
(row, col) order; velocities in pixels per unit time; frames at t_k = k/(T-1).
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from echo_ode_jax import flow
from echo_ode_jax.fit import FitConfig
from echo_ode_jax.kernels import gaussian_kernel1d
from echo_ode_jax.model import ModelConfig

TERMS = ("sim", "seg", "ef", "jdet", "smt")
# FitConfig fields beyond the paper's single-grid step, and the values that turn
# them off: the peer refuses any other value.
PAPER_STEP = {"lambda_ncc": 0.0, "pyramid_levels": 1, "affine_steps": 0, "dense_steps": 0,
              "velocity_stride": 1, "velocity_sigma": 0.0, "ensemble": 1}
LV = 1


# ----------------------------------------------------------------------------- model

def positional_encoding(t, dim: int, max_period: float = 1e4):
  """(K,) times in [0, 1] -> (K, dim) sinusoidal encoding of 1000 t."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  ang = (1000.0 * t)[:, None] * freqs[None]
  return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1)


def _same_pads(n: int, k: int, s: int) -> tuple[int, int]:
  """flax/XLA "SAME" padding (lo, hi) of one axis of size n, kernel k, stride s."""
  out = -(-n // s)
  total = max((out - 1) * s + k - n, 0)
  return total // 2, total - total // 2


class SameConv(nn.Conv2d):
  """3x3 conv with flax "SAME" padding (asymmetric for stride 2 on even sizes)."""

  def __init__(self, cin: int, cout: int, stride: int = 1):
    super().__init__(cin, cout, 3, stride=stride, padding=0)

  def forward(self, x):
    s = self.stride[0]
    if s == 1:
      return F.conv2d(x, self.weight, self.bias, padding=1)
    (t, b), (l, r) = (_same_pads(x.shape[-2], 3, s), _same_pads(x.shape[-1], 3, s))
    return F.conv2d(F.pad(x, (l, r, t, b)), self.weight, self.bias, stride=s)


def resize_nearest(x, shape_hw):
  """(N, C, h, w) -> (N, C, th, tw) by strided sampling, as model._resize_nearest."""
  h, w = x.shape[-2:]
  th, tw = shape_hw
  if (h, w) == (th, tw):
    return x
  ri = (torch.arange(th) * h) // th
  ci = (torch.arange(tw) * w) // tw
  return x[..., ri, :][..., ci]


def upsample2(x, shape_hw):
  """x2 nearest upsampling of (N, C, h, w), cropped to (H, W)."""
  x = F.interpolate(x, scale_factor=2.0, mode="nearest")   # source index floor(i / 2)
  if tuple(x.shape[-2:]) != tuple(shape_hw):
    x = x[..., :shape_hw[0], :shape_hw[1]]
  return x


class SpadeTime(nn.Module):
  """gamma, beta for one decoder map from m_0 (shared) and PE(t) (per knot);
  `time` as ModelConfig.spade_time ("hidden" or "gain")."""

  def __init__(self, channels: int, hidden: int, num_classes: int, pe_dim: int | None,
               time: str = "hidden"):
    super().__init__()
    self.channels, self.mode = channels, time
    self.shared = SameConv(num_classes, hidden)
    t_out = hidden if time == "hidden" else 2 * channels
    self.time = nn.Linear(pe_dim, t_out) if pe_dim else None
    self.gamma_beta = SameConv(hidden, 2 * channels)

  def forward(self, f, m0_n, pe):
    """f (K, C, h, w); m0_n (1, classes, h, w); pe (K, pe_dim) or None."""
    hid = self.shared(m0_n)
    if self.time is not None and self.mode == "hidden":
      hid = hid + self.time(pe)[:, :, None, None]
    gb = self.gamma_beta(F.relu(hid))
    gamma, beta = gb.split(self.channels, dim=1)
    if self.time is not None and self.mode == "gain":
      gain = 1.0 + self.time(pe)[:, :, None, None]        # (K, 2C, 1, 1)
      gamma, beta = gamma * gain[:, :self.channels], beta * gain[:, self.channels:]
    var, mean = torch.var_mean(f, dim=(2, 3), keepdim=True, correction=0)
    f = (f - mean) * torch.rsqrt(var + 1e-5)
    return f * (1.0 + gamma) + beta


class TorchVelocityUNet(nn.Module):
  """V_theta(I_t, m_0, t): images (K, 1, H, W), m0 (C, H, W), t (K,) -> (K, 2, H, W).

  Submodule names follow the flax tree (enc0, pe_proj, dec0, spade0.shared, ...,
  flow). Output: velocity in pixels per unit time, channels (row, col).
  """

  def __init__(self, config: ModelConfig = ModelConfig()):
    super().__init__()
    if config.compute_dtype != "float32":
      raise ValueError("TorchVelocityUNet: only compute_dtype='float32' is reproduced")
    self.config = cfg = config
    cin = 2 if cfg.input_i0 else 1
    skip_ch = [cin]
    for i, ch in enumerate(cfg.enc_channels):
      setattr(self, f"enc{i}", SameConv(skip_ch[-1], ch, stride=2))
      skip_ch.append(ch)
    if cfg.use_pe:
      self.pe_proj = nn.Linear(cfg.pe_dim, skip_ch[-1])
    n_up = len(cfg.enc_channels)
    c = skip_ch[-1]
    for i, ch in enumerate(cfg.dec_channels):
      setattr(self, f"dec{i}", SameConv(c, ch))
      if cfg.use_spade:
        setattr(self, f"spade{i}", SpadeTime(ch, cfg.spade_hidden, cfg.num_classes,
                                             cfg.pe_dim if cfg.use_pe else None,
                                             cfg.spade_time))
      c = ch + (skip_ch[n_up - 1 - i] if i < n_up else 0)
    self.flow = SameConv(c, 2)
    nn.init.zeros_(self.flow.weight)
    nn.init.zeros_(self.flow.bias)

  def forward(self, images, m0, t, i0=None):
    cfg = self.config
    x = images
    if cfg.input_i0:
      x = torch.cat([x, i0[None].expand_as(x)], dim=1)
    pe = positional_encoding(t, cfg.pe_dim) if (cfg.use_pe or cfg.use_spade) else None
    skips = [x]
    for i in range(len(cfg.enc_channels)):
      x = F.leaky_relu(getattr(self, f"enc{i}")(x), 0.2)
      skips.append(x)
    if cfg.use_pe:
      x = x + self.pe_proj(pe)[:, :, None, None]
    m0 = m0[None]
    n_up = len(cfg.enc_channels)
    for i in range(len(cfg.dec_channels)):
      x = getattr(self, f"dec{i}")(x)
      if cfg.use_spade:
        m0_n = resize_nearest(m0, x.shape[-2:])
        x = getattr(self, f"spade{i}")(x, m0_n, pe if cfg.use_pe else None)
      x = F.leaky_relu(x, 0.2)
      if i < n_up:
        skip = skips[n_up - 1 - i]
        x = torch.cat([upsample2(x, skip.shape[-2:]), skip], dim=1)
    return self.flow(x) * cfg.velocity_scale


def _flax_items(tree, prefix=()):
  for k, v in tree.items():
    if hasattr(v, "items"):
      yield from _flax_items(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def _to_torch_layout(name: str, a: np.ndarray) -> np.ndarray:
  if name == "kernel":   # conv HWIO -> OIHW; Dense (in, out) -> (out, in)
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
  return a


def _to_flax_layout(name: str, a: np.ndarray) -> np.ndarray:
  if name == "kernel":
    return a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T
  return a


def _torch_key(path) -> str:
  return ".".join(path[:-1] + ({"kernel": "weight", "bias": "bias"}[path[-1]],))


@torch.no_grad()
def params_from_flax(module: TorchVelocityUNet, flax_params) -> TorchVelocityUNet:
  """Copies a flax tree (``model.init_params``) into `module` (conv HWIO -> OIHW,
  Dense (in, out) -> (out, in)); every tensor must be matched. Returns `module`."""
  state = dict(module.named_parameters())
  seen = set()
  for path, v in _flax_items(flax_params):
    key = _torch_key(path)
    if key not in state:
      raise KeyError(f"params_from_flax: no torch parameter for {'/'.join(path)}")
    a = _to_torch_layout(path[-1], np.array(v, np.float32))
    if tuple(a.shape) != tuple(state[key].shape):
      raise ValueError(f"params_from_flax: {key}: {a.shape} vs {tuple(state[key].shape)}")
    state[key].copy_(torch.from_numpy(np.ascontiguousarray(a)))  # a is a writable copy
    seen.add(key)
  missing = set(state) - seen
  if missing:
    raise KeyError(f"params_from_flax: not in the flax tree: {sorted(missing)}")
  return module


def to_flax(module: TorchVelocityUNet, grads: bool = False) -> dict:
  """The module's parameters (or their .grad) as a nested dict in flax layout (numpy)."""
  out: dict = {}
  for key, p in module.named_parameters():
    parts = key.split(".")
    name = {"weight": "kernel", "bias": "bias"}[parts[-1]]
    t = p.grad if grads else p
    a = np.zeros(p.shape, np.float32) if t is None else t.detach().numpy()
    d = out
    for part in parts[:-1]:
      d = d.setdefault(part, {})
    d[name] = _to_flax_layout(name, a)
  return out


# ----------------------------------------------------------------------------- kernels

def identity_grid(h: int, w: int):
  """(H, W, 2) absolute (row, col) pixel positions."""
  r, c = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                        torch.arange(w, dtype=torch.float32), indexing="ij")
  return torch.stack([r, c], dim=-1)


def warp(img, coords):
  """Bilinear sampling with border padding: img (N, C, H, W) at coords (N, H', W', 2)
  absolute (row, col) pixel positions -> (N, C, H', W'), as kernels.warp.

  A NaN position gives NaN samples, as in JAX (grid_sample itself would clamp it
  to the border, and its backward pass crashes on NaN grids).
  """
  h, w = img.shape[-2:]
  gx = coords[..., 1] * (2.0 / (w - 1)) - 1.0   # grid_sample wants (x, y) = (col, row)
  gy = coords[..., 0] * (2.0 / (h - 1)) - 1.0
  nan = torch.isnan(gx + gy)
  grid = torch.stack([gx, gy], dim=-1).masked_fill(nan[..., None], 0.0)
  out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border",
                      align_corners=True)
  return out.masked_fill(nan[:, None], float("nan"))


def gaussian_blur(x, sigma: float, truncate: float = 4.0):
  """Separable blur of (N, H, W) as scipy.ndimage.gaussian_filter(mode="reflect")."""
  if sigma == 0:
    return x
  taps = torch.from_numpy(gaussian_kernel1d(sigma, truncate))
  r = (len(taps) - 1) // 2
  x = x[:, None]
  for axis in (2, 3):
    n = x.shape[axis]
    if r <= n:   # half-sample symmetric pad (F.pad "reflect" is scipy's "mirror")
      lo = x.narrow(axis, 0, r).flip(axis)
      hi = x.narrow(axis, n - r, r).flip(axis)
      xp = torch.cat([lo, x, hi], dim=axis)
    else:
      xp = F.pad(x, (r, r, 0, 0) if axis == 3 else (0, 0, r, r), mode="replicate")
    k = taps.view(1, 1, -1, 1) if axis == 2 else taps.view(1, 1, 1, -1)
    x = F.conv2d(xp, k)
  return x[:, 0]


def _diff(f, dim):
  """Central differences inside, one-sided at the ends (numpy.gradient)."""
  n = f.shape[dim]
  first = f.narrow(dim, 1, 1) - f.narrow(dim, 0, 1)
  last = f.narrow(dim, n - 1, 1) - f.narrow(dim, n - 2, 1)
  if n == 2:
    return torch.cat([first, last], dim=dim)
  inner = 0.5 * (f.narrow(dim, 2, n - 2) - f.narrow(dim, 0, n - 2))
  return torch.cat([first, inner, last], dim=dim)


def jacobian_determinant(phi):
  """det(D phi) of (T, H, W, 2) maps -> (T, H, W)."""
  pr, pc = phi[..., 0], phi[..., 1]
  return _diff(pr, 1) * _diff(pc, 2) - _diff(pr, 2) * _diff(pc, 1)


def smoothness(phi, order: int = 1):
  """(T,) R_smt of phi - id per map: mean squared forward-difference gradient
  (order 1) or bending energy (order 2), as losses.smoothness."""
  u = phi - identity_grid(*phi.shape[1:3])
  sq = lambda d: d.square().sum(-1).mean((1, 2))
  if order == 1:
    return sq(u[:, 1:] - u[:, :-1]) + sq(u[:, :, 1:] - u[:, :, :-1])
  uyy = u[:, 2:] - 2 * u[:, 1:-1] + u[:, :-2]
  uxx = u[:, :, 2:] - 2 * u[:, :, 1:-1] + u[:, :, :-2]
  uxy = u[:, 1:, 1:] - u[:, 1:, :-1] - u[:, :-1, 1:] + u[:, :-1, :-1]
  return sq(uyy) + sq(uxx) + 2 * sq(uxy)


# ----------------------------------------------------------------------------- data and flow

def seq_tensors(seq: dict) -> dict:
  """A prepared sequence (``fit.prepare_sequence``, numpy) as torch tensors.

  images / images_smooth (T, H, W), image_knots (K, 1, H, W), m0 / guide_es /
  guide_ed (C, H, W), i0 (1, H, W), frame_times / frame_valid (T,); es_index an int,
  frame_times_np the float64 numpy copy.
  """
  f = lambda k: torch.from_numpy(np.array(seq[k], np.float32))
  chw = lambda k: f(k).permute(2, 0, 1).contiguous()
  images = f("images")
  return {
      "images": images, "images_smooth": f("images_smooth"),
      "image_knots": f("image_knots")[:, None].contiguous(),
      "m0": chw("m0"), "guide_es": chw("guide_es"), "guide_ed": chw("guide_ed"),
      "i0": images[:1].clone(), "frame_times": f("frame_times"),
      "frame_times_np": np.asarray(seq["frame_times"], np.float64),
      "frame_valid": f("frame_valid"), "es_index": int(seq["es_index"]),
      "has_guide": float(seq["has_guide"]),
  }


def _euler_grid(cfg: FitConfig) -> np.ndarray:
  if cfg.solver.lower() != "euler":
    raise ValueError(f"peer_torch reproduces the Euler solver only, got {cfg.solver!r}")
  beyond = {k: getattr(cfg, k) for k, off in PAPER_STEP.items() if getattr(cfg, k) != off}
  if beyond:
    raise ValueError(f"peer_torch reproduces the paper's step only; set {beyond} to "
                     f"{ {k: PAPER_STEP[k] for k in beyond} }")
  n = flow.num_steps(0.0, 1.0, cfg.dt)
  return np.minimum(cfg.dt * np.arange(n + 1), 1.0)


def flow_batched(model, s: dict, cfg: FitConfig):
  """phi (T, H, W, 2) at the frame times: knots in one call, then Euler steps."""
  edges = _euler_grid(cfg)
  kt = torch.from_numpy(np.asarray(flow.knot_times(cfg.solver, cfg.dt), np.float32))
  knots = model(s["image_knots"], s["m0"], kt, s["i0"])        # (K, 2, H, W)
  h, w = knots.shape[-2:]
  phi = identity_grid(h, w)
  states = [phi]
  for n in range(len(edges) - 1):
    v = warp(knots[n:n + 1], phi[None])[0].permute(1, 2, 0)      # (H, W, 2)
    phi = phi + float(edges[n + 1] - edges[n]) * v
    states.append(phi)
  states = torch.stack(states)                                  # (N+1, H, W, 2)
  # diffrax's Euler dense output: linear within the step containing each time.
  ft = s["frame_times_np"]
  i = np.clip(np.searchsorted(edges, ft, side="right") - 1, 0, len(edges) - 2)
  wt = np.clip((ft - edges[i]) / (edges[i + 1] - edges[i]), 0.0, 1.0)
  wt = torch.from_numpy(wt.astype(np.float32))[:, None, None, None]
  i = torch.from_numpy(i)
  return states[i] * (1.0 - wt) + states[i + 1] * wt


def frames_at(s: dict, t):
  """The image at time t (0-d tensor), linear between frames: (1, 1, H, W)."""
  times = s["frame_times"]
  k = torch.clamp(torch.searchsorted(times, t.reshape(1), right=True) - 1, 0,
                  max(s["es_index"] - 1, 0))
  lo, hi = times[k], times[k + 1]
  w = torch.clamp((t - lo) / torch.clamp(hi - lo, min=1e-12), 0.0, 1.0)[:, None, None]
  return (s["images"][k] * (1 - w) + s["images"][k + 1] * w)[:, None]


def flow_odeint(model, s: dict, cfg: FitConfig):
  """phi (T, H, W, 2) with the network inside a torchdiffeq Euler vector field."""
  from torchdiffeq import odeint
  _euler_grid(cfg)
  t_valid = s["es_index"] + 1
  times = s["frame_times"][:t_valid]           # strictly increasing, 0 .. 1

  def field(t, phi):
    v = model(frames_at(s, t), s["m0"], t.reshape(1), s["i0"])
    return warp(v, phi[None])[0].permute(1, 2, 0)

  h, w = s["images"].shape[-2:]
  phi = odeint(field, identity_grid(h, w), times, method="euler",
               options=dict(step_size=cfg.dt))
  pad = s["images"].shape[0] - t_valid        # padded frames sit at t = 1
  return torch.cat([phi, phi[-1:].expand(pad, -1, -1, -1)]) if pad else phi


def _soft_dice_loss(p, g, eps: float = 1.0):
  p, g = p[1:], g[1:]
  inter = (p * g).sum((1, 2))
  denom = p.sum((1, 2)) + g.sum((1, 2))
  return 1.0 - ((2.0 * inter + eps) / (denom + eps)).mean()


def _area_ef(ed, es, eps: float = 1e-6):
  return 1.0 - es[LV].sum() / (ed[LV].sum() + eps)


def loss_terms(model, s: dict, cfg: FitConfig, formulation: str = "batched"):
  """The unweighted terms {sim, seg, ef, jdet, smt} (0-d tensors) and phi (T, H, W, 2)."""
  if formulation not in ("batched", "odeint"):
    raise ValueError(f"formulation must be 'batched' or 'odeint', got {formulation!r}")
  phi = (flow_batched if formulation == "batched" else flow_odeint)(model, s, cfg)
  t = phi.shape[0]
  valid = s["frame_valid"]
  nvalid = torch.clamp(valid.sum(), min=1.0)
  warped = warp(s["i0"][None].expand(t, -1, -1, -1), phi)[:, 0]     # (T, H, W)
  if cfg.sigma > 0:
    warped = gaussian_blur(warped, cfg.sigma)
  sim = ((warped - s["images_smooth"]).square().mean((1, 2)) * valid).sum() / nvalid
  m_es = warp(s["m0"][None], phi[s["es_index"]][None])[0]           # (C, H, W)
  seg = _soft_dice_loss(m_es, s["guide_es"]) * s["has_guide"]
  ef = (_area_ef(s["m0"], m_es) - _area_ef(s["guide_ed"], s["guide_es"])).abs()
  ef = ef * s["has_guide"]
  jdet_t = F.relu(cfg.jdet_margin - jacobian_determinant(phi)).square().mean((1, 2))
  jdet = (jdet_t * valid).sum() / nvalid
  smt = (smoothness(phi, cfg.smt_order) * valid).sum() / nvalid
  return {"sim": sim, "seg": seg, "ef": ef, "jdet": jdet, "smt": smt}, phi


def total_loss(terms: dict, cfg: FitConfig):
  return sum(getattr(cfg, f"lambda_{k}") * terms[k] for k in TERMS)


# ----------------------------------------------------------------------------- fit

class TorchFit:
  """Independent per-sequence fits: one model + Adam(cfg.lr) per sequence.

  As fit._optimizer: the gradient's global norm is clipped to cfg.clip_norm and
  the lr follows optax.cosine_decay_schedule when cfg.lr_decay == "cosine".
  (fit's keep_best bookkeeping, one select per parameter, is not mirrored.)

  Args:
    seqs: prepared sequences (``fit.prepare_sequence``), numpy dicts.
    cfg: the FitConfig (Euler solver; model, lr, dt, sigma, lambdas are used).
    jax_params: a flax tree, or one per sequence, copied into the models; default
      ``init_params(cfg.model, fold_in(PRNGKey(cfg.seed), i), (H, W))`` as fit_batch.
    formulation: "batched" or "odeint".
    threads: torch.set_num_threads(threads) when given.
  """

  def __init__(self, seqs, cfg: FitConfig = FitConfig(), jax_params=None,
               formulation: str = "batched", threads: int | None = None):
    if threads:
      torch.set_num_threads(int(threads))
    if formulation not in ("batched", "odeint"):
      raise ValueError(f"formulation must be 'batched' or 'odeint', got {formulation!r}")
    _euler_grid(cfg)
    self.cfg, self.formulation = cfg, formulation
    self.seqs = [seq_tensors(s) for s in seqs]
    per_seq = isinstance(jax_params, (list, tuple))
    self.models, self.opts, self.failed = [], [], []
    for i, s in enumerate(self.seqs):
      p = jax_params[i] if per_seq else jax_params
      if p is None:
        import jax
        from echo_ode_jax.model import init_params
        key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), i)
        p = init_params(cfg.model, key, tuple(s["images"].shape[-2:]))
      model = params_from_flax(TorchVelocityUNet(cfg.model), p)
      self.models.append(model)
      self.opts.append(torch.optim.Adam(model.parameters(), lr=cfg.lr,
                                        betas=(0.9, 0.999), eps=1e-8))
      self.failed.append(False)
    self.num_steps = 0

  def lr(self, step: int) -> float:
    """fit.lr_schedule: optax.cosine_decay_schedule(cfg.lr, cfg.steps, cfg.lr_final)
    or cfg.lr, times min(1, step / cfg.warmup_steps) with a warm-up."""
    cfg = self.cfg
    warm = min(1.0, step / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_decay == "constant":
      return cfg.lr * warm
    n = max(1, cfg.steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(step, n) / n))
    return cfg.lr * ((1 - cfg.lr_final) * cosine + cfg.lr_final) * warm

  def loss_terms(self, i: int = 0):
    """(terms, phi) of sequence i with the current parameters (no update)."""
    return loss_terms(self.models[i], self.seqs[i], self.cfg, self.formulation)

  def step(self) -> list[float]:
    """One Adam step of every sequence; returns the losses before the update.

    As fit.make_step, a step with a non-finite loss or gradient is not applied
    and the sequence stays frozen from then on.
    """
    out = []
    for i, (model, opt, s) in enumerate(zip(self.models, self.opts, self.seqs)):
      opt.zero_grad(set_to_none=True)
      terms, _ = loss_terms(model, s, self.cfg, self.formulation)
      loss = total_loss(terms, self.cfg)
      loss.backward()
      grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()
                         if p.grad is not None])
      finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grads).all())
      if finite and not self.failed[i]:
        norm = float(torch.linalg.vector_norm(grads))
        if self.cfg.clip_norm is not None and norm >= self.cfg.clip_norm:
          for p in model.parameters():   # optax.clip_by_global_norm
            if p.grad is not None:
              p.grad.mul_(self.cfg.clip_norm / norm)
        for group in opt.param_groups:
          group["lr"] = self.lr(self.num_steps)
        opt.step()
      self.failed[i] = self.failed[i] or not finite
      out.append(loss.item())
    self.num_steps += 1
    return out


def _main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--size", type=int, default=128, help="image side, pixels")
  ap.add_argument("--frames", type=int, default=20, help="frames per sequence")
  ap.add_argument("--batch", type=int, default=1, help="sequences fitted together")
  ap.add_argument("--steps", type=int, default=10, help="timed Adam steps")
  ap.add_argument("--formulation", choices=("batched", "odeint"), default="batched")
  ap.add_argument("--threads", type=int, default=None,
                  help="torch threads (more threads than free cores stalls OpenMP)")
  args = ap.parse_args(argv)
  from echo_ode_jax.data import synthetic
  from echo_ode_jax.fit import prepare_sequence
  cfg = FitConfig(lambda_ncc=0.0)   # the paper's terms (PAPER_STEP)
  seqs = []
  for i in range(args.batch):
    sq, _ = synthetic.make_sequence(i, size=args.size, num_frames=args.frames)
    seqs.append(prepare_sequence(sq.img, sq.gt[0], sq.gt[-1], cfg=cfg))
  fit = TorchFit(seqs, cfg, formulation=args.formulation, threads=args.threads)
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    losses = fit.step()
    times.append(time.perf_counter() - t0)
  print(f"torch {torch.__version__} {args.formulation} size={args.size} "
        f"frames={args.frames} batch={args.batch} threads={torch.get_num_threads()}: "
        f"median {statistics.median(times):.4f} s/step over {args.steps} steps "
        f"(last loss {np.mean(losses):.5g})")


if __name__ == "__main__":
  _main()
