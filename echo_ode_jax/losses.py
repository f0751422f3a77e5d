"""Echo-ODE losses (paper section IV-B), a pure function of (params, sequence, config).

The sequence is a prepared sequence (:mod:`echo_ode_jax.sequence`: keys, shapes, units).

Terms (each has a weight in FitConfig):
  L_sim   mean over frames of MSE(K * (I_0 o phi_t), K * I_t)
  L_ncc   mean over frames of 1 - local NCC^2(I_0 o phi_t, I_t) in w x w windows
          (VoxelMorph's windowed cross-correlation; not in the paper), both images
          first smoothed by a Gaussian of ncc_sigma pixels when ncc_sigma > 0
          (cfg.similarity "symmetric": L_sim and L_ncc are the means of the above
          and of the same comparison of I_t o phi_t^{-1} with I_0 on I_0's grid)
  L_seg   soft Dice loss between m_0 o phi_ES and m_1 (classes 1..C-1)
  L_EF    |EF(propagated) - EF(guide)|, LV area as the volume proxy
  R_Jdet  mean over t of mean(ReLU(jdet_margin - det D phi_t)^2) (margin 0: the paper's)
  R_smt   mean over t of the mean squared spatial gradient of phi_t - id
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from echo_ode_jax import affine, dense, flow
from echo_ode_jax.kernels import gaussian_blur, jdet_penalty, warp_data
from echo_ode_jax.sequence import frames_at, shrink

LV = 1
TERMS = ("sim", "ncc", "seg", "ef", "jdet", "smt")


def soft_dice_loss(p, g, eps: float = 1.0):
  """1 - mean over foreground classes of soft Dice; p, g: (H, W, C), class 0 ignored."""
  p, g = p[..., 1:], g[..., 1:]
  inter = jnp.sum(p * g, axis=(0, 1))
  denom = jnp.sum(p, axis=(0, 1)) + jnp.sum(g, axis=(0, 1))
  return 1.0 - jnp.mean((2.0 * inter + eps) / (denom + eps))


def _box_sum(x, window: int):
  """Sums of (T, H, W) maps over window x window neighbourhoods (zero padding)."""
  pad = (window - 1) // 2, window // 2
  cfg = dict(padding=((0, 0), pad, (0, 0)))
  x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, window, 1), (1, 1, 1), **cfg)
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, window), (1, 1, 1),
                               padding=((0, 0), (0, 0), pad))


def local_ncc(a, b, window: int = 9, eps: float = 1e-5):
  """Squared local normalised cross-correlation per frame: (T, H, W) x 2 -> (T,).

  For each pixel, cc = cov(a, b)^2 / (var(a) var(b) + eps) over the window x
  window neighbourhood inside the frame (VoxelMorph's NCC loss, with the
  window's true pixel count at the border instead of zero padding, which
  would make any bright edge correlate); the result is the mean of cc over
  the frame, in [0, 1].
  """
  n = _box_sum(jnp.ones((1,) + a.shape[1:], a.dtype), window)
  sa, sb = _box_sum(a, window), _box_sum(b, window)
  saa, sbb, sab = _box_sum(a * a, window), _box_sum(b * b, window), _box_sum(a * b, window)
  cross = sab - sa * sb / n
  var_a = jnp.maximum(saa - sa * sa / n, 0.0)
  var_b = jnp.maximum(sbb - sb * sb / n, 0.0)
  return jnp.mean(cross * cross / (var_a * var_b + eps), axis=(1, 2))


def area_ef(ed, es, eps: float = 1e-6):
  """1 - A_ES / A_ED with the LV (label 1) area of soft or one-hot maps (H, W, C)."""
  return 1.0 - jnp.sum(es[..., LV]) / (jnp.sum(ed[..., LV]) + eps)


def smoothness(phi, order: int = 1):
  """R_smt of one map (H, W, 2) (pixels); u = phi - id.

  order 1 (the paper's): mean squared forward-difference gradient of u,
    E|du/dy|^2 + E|du/dx|^2; it is zero only for translations, so it also
    resists a uniform contraction.
  order 2: the bending energy of u, E|d2u/dy2|^2 + E|d2u/dx2|^2 + 2 E|d2u/dydx|^2
    (three-point second differences along an axis, the 2x2 stencil for the
    mixed term); zero for every affine map, so it penalises how the motion
    bends, not how much the heart contracts. Its value in a grid reduced f
    times is f^2 times that of the same motion in the full grid (fit.pyramid
    divides the weight accordingly).
  """
  u = flow.displacement(phi)
  if order == 1:
    return (jnp.mean(jnp.sum(jnp.diff(u, axis=0) ** 2, -1))
            + jnp.mean(jnp.sum(jnp.diff(u, axis=1) ** 2, -1)))
  uyy = jnp.diff(u, 2, axis=0)
  uxx = jnp.diff(u, 2, axis=1)
  uxy = jnp.diff(jnp.diff(u, axis=0), axis=1)
  return (jnp.mean(jnp.sum(uyy ** 2, -1)) + jnp.mean(jnp.sum(uxx ** 2, -1))
          + 2 * jnp.mean(jnp.sum(uxy ** 2, -1)))


def _velocity_at_stride(params, images, m0, t, i0, stride, apply_fn):
  """One network run on the inputs resized to ceil(H / stride) x ceil(W / stride)
  (antialiased), its velocity resized back bilinearly and rescaled to full-grid
  pixels: (K, H, W, 2)."""
  if stride == 1:
    return apply_fn({"params": params}, images, m0, t, i0)
  k, h, w = images.shape[:3]
  down = lambda x: shrink(x, stride, channels=True)
  v = apply_fn({"params": params}, down(images), down(m0), t, down(i0))
  hs, ws = v.shape[1:3]
  return jax.image.resize(v, (k, h, w, 2), "linear") * jnp.asarray([h / hs, w / ws], v.dtype)


def velocity(params, images, m0, t, i0, cfg, apply_fn):
  """V_theta at times t: images (K, H, W, 1), m0 (H, W, C), t (K,), i0 (H, W, 1)
  -> (K, H, W, 2) pixels per unit time.

  With cfg.velocity_stride = s > 1 the network sees the inputs resized
  (antialiased) to ceil(H / s) x ceil(W / s), and its velocity is resized back
  bilinearly and rescaled to full-grid pixels: a smoother field, s^2 times
  cheaper to compute.

  With cfg.velocity_sigma > 0 the velocity is smoothed with a Gaussian of
  that many pixels (the fluid-like regularisation of SyN and demons).

  params is one network's parameters, or a tuple of n (coarse-to-fine fitting,
  FitConfig.pyramid_levels): then V is the sum of the n networks' velocities,
  network j run at stride s * 2^(n-1-j) (the first the coarsest). The tuple
  may start with an :class:`affine.AffineVelocity` (FitConfig.affine_steps)
  and end with a :class:`dense.DenseVelocity` (FitConfig.dense_steps), whose
  fields are added; with a dense field the other components are held fixed
  (no gradient flows to them): the dense stage refines the flow they fitted.
  """
  s = cfg.velocity_stride
  if not isinstance(params, (tuple, list)):
    v = _velocity_at_stride(params, images, m0, t, i0, s, apply_fn)
  else:
    nets = list(params)
    v = jnp.zeros(images.shape[:3] + (2,), images.dtype)
    kt = flow.knot_times(cfg.solver, cfg.dt)
    if nets and isinstance(nets[-1], dense.DenseVelocity):
      v = v + dense.velocity(nets.pop(), t, kt, images.shape[1:3])
      nets = list(jax.lax.stop_gradient(tuple(nets)))    # the dense stage refines them
    if nets and isinstance(nets[0], affine.AffineVelocity):
      v = v + affine.velocity(nets.pop(0), t, kt, images.shape[1:3])
    n = len(nets)
    v = v + sum((_velocity_at_stride(p, images, m0, t, i0, s * 2 ** (n - 1 - j), apply_fn)
                 for j, p in enumerate(nets)), jnp.zeros_like(v))
  if cfg.velocity_sigma > 0:
    v = jnp.moveaxis(gaussian_blur(jnp.moveaxis(v, -1, -3), cfg.velocity_sigma), -3, -1)
  return v


def velocity_knots(params, seq, cfg, apply_fn):
  """The network at every knot time, in one batched call: (K, H, W, 2)."""
  kt = jnp.asarray(flow.knot_times(cfg.solver, cfg.dt), jnp.float32)
  i0 = seq["images"][0][..., None]
  return velocity(params, seq["image_knots"][..., None], seq["m0"], kt, i0, cfg, apply_fn)


def flow_batched(params, seq, cfg, apply_fn):
  """phi at the frame times: (T, H, W, 2); the network runs once at all knot times."""
  return flow_of_knots(velocity_knots(params, seq, cfg, apply_fn), seq, cfg)


def flow_of_knots(knots, seq, cfg):
  """phi at the frame times (T, H, W, 2) of a velocity given at the knot times
  (K, H, W, 2), pixels per unit time."""
  kt = flow.knot_times(cfg.solver, cfg.dt)
  return flow.integrate_flow(knots, kt, seq["frame_times"], cfg.solver, cfg.dt, t1=1.0)


def flow_inloop(params, seq, cfg, apply_fn):
  """Reference: the network is called inside the ODE vector field (slow)."""
  i0 = seq["images"][0][..., None]
  h, w = seq["images"].shape[1:]

  def velocity_at(t):
    img_t = frames_at(seq["images"], seq["frame_times"], seq["es_index"], t[None])
    return velocity(params, img_t[..., None], seq["m0"], t[None], i0, cfg, apply_fn)[0]

  return flow.integrate_flow_inloop(velocity_at, (h, w), seq["frame_times"], cfg.solver,
                                    cfg.dt, t1=1.0)


def loss_terms(params, seq, cfg, apply_fn, formulation: str = "batched"):
  """All loss terms (unweighted) and phi. Returns (terms dict, phi (T, H, W, 2)).

  The symmetric similarity's phi_t^{-1} is the backward flow of the knots
  (batched), or flow.invert_map of phi_t (inloop, the reference)."""
  if formulation != "batched":
    phi = flow_inloop(params, seq, cfg, apply_fn)
    return terms_from_phi(phi, seq, cfg), phi
  knots = velocity_knots(params, seq, cfg, apply_fn)
  phi = flow_of_knots(knots, seq, cfg)
  return terms_from_phi(phi, seq, cfg, inverse_maps(knots, seq, cfg)), phi


def inverse_maps(knots, seq, cfg):
  """phi_t^{-1} at the frame times (T, H, W, 2) of a velocity given at the knot
  times (K, H, W, 2), for cfg.similarity "symmetric": -V integrated from each t
  back to 0 (flow.inverse_flow); None when cfg.similarity is "forward"."""
  if cfg.similarity != "symmetric":
    return None
  kt = flow.knot_times(cfg.solver, cfg.dt)
  return flow.inverse_flow(knots, kt, seq["frame_times"], cfg.solver, cfg.dt)


def terms_from_phi(phi, seq, cfg, psi=None):
  """The unweighted terms for given maps phi (T, H, W, 2) (pixels) of a prepared sequence.

  psi: phi_t^{-1} (T, H, W, 2) for cfg.similarity "symmetric" (default
  flow.invert_map of each phi_t, exact for the discrete map where it does not
  fold; a fit passes the backward flow of its velocity, inverse_maps).

  Frames with frame_valid = 0 (T-bucket padding) count in no term; L_seg and
  L_EF are zero when has_guide = 0.
  """
  valid = seq["frame_valid"]
  nvalid = jnp.maximum(jnp.sum(valid), 1.0)
  i0 = seq["images"][0][..., None]
  raw = jax.vmap(warp_data, (None, 0))(i0, phi)[..., 0]              # (T, H, W)
  sim_t, ncc_t = _similarity(raw, seq["images"], seq["images_smooth"], cfg)
  if cfg.similarity == "symmetric":
    psi = jax.vmap(flow.invert_map)(phi) if psi is None else psi        # phi_t^-1
    back = jax.vmap(warp_data)(seq["images"][..., None], psi)[..., 0]   # I_t o phi_t^-1
    sim_b, ncc_b = _similarity(back, seq["images"][:1], seq["images_smooth"][:1], cfg)
    sim_t, ncc_t = (sim_t + sim_b) / 2, (ncc_t + ncc_b) / 2
  sim = jnp.sum(sim_t * valid) / nvalid
  ncc = jnp.sum(ncc_t * valid) / nvalid

  phi_es = jax.lax.dynamic_index_in_dim(phi, seq["es_index"], 0, keepdims=False)
  m_es = warp_data(seq["m0"], phi_es)                                  # (H, W, C)
  seg = soft_dice_loss(m_es, seq["guide_es"]) * seq["has_guide"]
  ef = jnp.abs(area_ef(seq["m0"], m_es) - area_ef(seq["guide_ed"], seq["guide_es"]))
  ef = ef * seq["has_guide"]

  jdet = jnp.sum(jax.vmap(jdet_penalty, (0, None))(phi, cfg.jdet_margin) * valid) / nvalid
  smt = jnp.sum(jax.vmap(lambda p: smoothness(p, cfg.smt_order))(phi) * valid) / nvalid
  return {"sim": sim, "ncc": ncc, "seg": seg, "ef": ef, "jdet": jdet, "smt": smt}


def _similarity(moved, target, target_smooth, cfg):
  """Per-frame (L_sim, L_ncc) of moved images (T, H, W) against targets (T or
  1, H, W) and those smoothed by cfg.sigma; L_ncc is 0 when lambda_ncc = 0."""
  smooth = gaussian_blur(moved, cfg.sigma) if cfg.sigma > 0 else moved
  sim_t = jnp.mean((smooth - target_smooth) ** 2, axis=(1, 2))
  if cfg.lambda_ncc <= 0:
    return sim_t, jnp.zeros_like(sim_t)
  a, b = moved, jnp.broadcast_to(target, moved.shape)
  if cfg.ncc_sigma > 0:
    a, b = gaussian_blur(a, cfg.ncc_sigma), gaussian_blur(b, cfg.ncc_sigma)
  return sim_t, 1.0 - local_ncc(a, b, cfg.ncc_window)


def total_loss(terms, cfg):
  """Weighted sum of the terms with cfg.lambda_<term>."""
  return sum(getattr(cfg, f"lambda_{k}") * terms[k] for k in TERMS)


def loss_fn(params, seq, cfg, apply_fn, formulation: str = "batched"):
  """(total loss, terms): the objective of Algorithm 1."""
  terms, _ = loss_terms(params, seq, cfg, apply_fn, formulation)
  return total_loss(terms, cfg), terms
