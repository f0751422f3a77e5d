"""Per-sequence Echo-ODE fit (Algorithm 1) and batched fitting sharded across devices.

One call fits one sequence with Adam (:class:`FitConfig`: lr, decay, clipping,
steps, solver); the parameters of the lowest loss are returned. The network is
evaluated at all knot times in one batched call and diffrax integrates the
flow (:mod:`echo_ode_jax.losses`). Frames sit at t_k = k / (T - 1). With
FitConfig.pyramid_levels > 1 the fit runs coarse to fine (:func:`pyramid`).

`fit_batch` fits B independent sequences. batch_mode "loop" (the default)
dispatches the same compiled single-sequence program, its state donated, for
each sequence at every chunk of steps (asynchronously; sequence i runs on
device i mod n of the mesh). batch_mode "vmap" splits the batch into one
share per device of the mesh and runs jit(vmap(step)) over each share's
stacked parameters and optimizer states on its device, the shares dispatched
asynchronously (no program communicates across devices: the fits are
independent, and a program sharded by XLA's partitioner instead all-gathers
the batch around every convolution and kernel); vmap over B networks lowers every
convolution to a grouped one, which is slower per sequence on CPU and GPU
(BENCHMARKS.md, "Batch modes"). Both give the same results up to float
rounding. Sequences of different lengths are padded to a common T bucket and
masked.

Ensembles: with FitConfig.ensemble = K > 1 every sequence is fitted K times
from K initialisations (member m's networks from fold_in(key, m); member 0 is
the fit from the key itself), the members fitted as more sequences of the
batch (in "loop" mode with the single fit's compiled programs) and their
states then stacked along a leading member axis. The returned phi is the flow
of the members' mean velocity at the knot times: one map, the flow of a
velocity field like each member's. FitConfig.ensemble_fusion says where the
masks come from: "velocity", m_0 carried by that phi (the loss terms are
evaluated at it); "labels", the mean of the members' soft m_0 o phi_k before
the argmax (label fusion: a pixel takes the label most members carry there,
so one member that moves differently shifts a contour less than it shifts a
mean velocity), with FitResult.member_phi the members' maps and the terms
and folding the means of the members'. A member whose loss turns non-finite
is left out of either mean; the sequence fails only if every member does.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, NamedTuple, Sequence as Seq

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from echo_ode_jax import affine, cpu_malloc, dense, flow, kernels, losses
from echo_ode_jax.config import PROPAGATIONS, REMOVED_FIELDS, FitConfig  # noqa: F401 (re-exported)
from echo_ode_jax.sequence import (NUM_CLASSES, bucket, downsample, frames_at,  # noqa: F401 (re-exported)
                                   prepare_sequence, stack, _one_hot, _repad)
from echo_ode_jax._progress import Progress
from echo_ode_jax.kernels import folding_fraction, hard_labels, warp_data
from echo_ode_jax.model import ModelConfig, VelocityUNet, init_params


@dataclasses.dataclass
class FitResult:
  """The outcome of one sequence fit.

  masks: (T, H, W) uint8 propagated labels argmax(m_0 o phi_t) (valid frames only).
  phi: (T, H, W, 2) float32 absolute maps at the frame times.
  history: {"loss": (steps,), "<term>": (steps,)}. failed / reason: a non-finite loss.
  final: the loss terms of the returned parameters: those of step best_step
  (cfg.keep_best; the lowest loss) or of the last step (best_step = -1).
  An ensemble (FitConfig.ensemble > 1): history is the mean over the members
  that did not fail, final holds the terms at the returned phi (no step of
  history; best_step = -1), and reason names members that failed even when
  the fit did not. With ensemble_fusion "labels", member_phi (K', T, H, W, 2)
  holds the maps of the K' members kept, masks fuse their labels, and final
  and folding_fraction are the means of the members' terms and folding.
  """
  masks: np.ndarray
  phi: np.ndarray
  history: dict[str, np.ndarray]
  final: dict[str, float]
  folding_fraction: float
  seconds: float
  failed: bool = False
  reason: str = ""
  best_step: int = -1
  member_phi: np.ndarray | None = None


def _model(cfg: FitConfig):
  return VelocityUNet(cfg.model)


def lr_schedule(cfg: FitConfig):
  """The lr at Adam step k of a stage (k from 0): cfg.lr, or its cosine decay to
  lr * lr_final over cfg.steps, times min(1, k / warmup_steps) when
  cfg.warmup_steps > 0 (a linear warm-up from 0)."""
  if cfg.lr_decay == "constant":
    base = optax.constant_schedule(cfg.lr)
  elif cfg.lr_decay == "cosine":
    base = optax.cosine_decay_schedule(cfg.lr, max(1, cfg.steps), alpha=cfg.lr_final)
  else:
    raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {cfg.lr_decay!r}")
  if not cfg.warmup_steps:
    return base
  return lambda k: base(k) * jnp.minimum(1.0, k / cfg.warmup_steps)


def _optimizer(cfg: FitConfig):
  """Adam (the paper), optionally with gradient clipping and lr_schedule's decay
  and warm-up (every stage of a pyramid starts a fresh one)."""
  adam = optax.adam(lr_schedule(cfg))
  if cfg.clip_norm is None:
    return adam
  return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adam)


def _select(cond, new, old):
  """Pytree-wise jnp.where(cond, new, old)."""
  return jax.tree_util.tree_map(lambda a, b: jnp.where(cond, a, b), new, old)


class FitState(NamedTuple):
  """The optimisation state of one sequence (a pytree; stacked for vmap).

  failed / fail_step: a non-finite loss or gradient froze the fit at fail_step.
  best_params / best_loss: the parameters with the lowest finite loss so far
  (what the fit returns when cfg.keep_best).
  """
  params: Any
  opt_state: Any
  failed: jax.Array
  fail_step: jax.Array
  best_params: Any
  best_loss: jax.Array


def make_step(cfg: FitConfig, formulation: str = "batched"):
  """One Adam step of one sequence with a non-finite guard.

  state: :class:`FitState`; returns (state, terms).
  A step whose loss or gradient is non-finite is not applied; the sequence is
  marked failed and its parameters stay frozen from then on. The loss of step
  i belongs to the parameters before its update, so those are the candidates
  for best_params.
  """
  apply_fn = _model(cfg).apply
  opt = _optimizer(cfg)

  def step(state, seq, i):
    params, opt_state, failed, fail_step, best_params, best_loss = state
    (loss, terms), grads = jax.value_and_grad(losses.loss_fn, has_aux=True)(
        params, seq, cfg, apply_fn, formulation)
    finite = jnp.isfinite(loss) & jnp.all(jnp.asarray(
        [jnp.all(jnp.isfinite(g)) for g in jax.tree_util.tree_leaves(grads)]))
    ok = finite & ~failed
    updates, new_opt = opt.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    params, opt_state = _select(ok, new_params, params), _select(ok, new_opt, opt_state)
    better = ok & (loss < best_loss)
    best_params = _select(better, state.params, best_params)
    best_loss = jnp.where(better, loss, best_loss)
    fail_step = jnp.where(~finite & ~failed, i, fail_step)
    failed = failed | ~finite
    return (FitState(params, opt_state, failed, fail_step, best_params, best_loss),
            dict(terms, loss=loss))

  return step


def init_state(cfg: FitConfig, key, shape_hw) -> FitState:
  params = init_params(cfg.model, key, shape_hw)
  return FitState(params, _optimizer(cfg).init(params), jnp.asarray(False),
                  jnp.asarray(-1, jnp.int32),
                  jax.tree_util.tree_map(jnp.array, params),   # a copy: state is donated
                  jnp.asarray(jnp.inf, jnp.float32))


def pyramid(cfg: FitConfig) -> list[tuple[int, FitConfig]]:
  """The stages of a fit, first to last: (grid reduction factor, stage config).

  With cfg.affine_steps > 0 the first stage fits the affine velocity alone
  (:mod:`echo_ode_jax.affine`) for affine_steps Adam steps on the grid reduced
  by cfg.affine_factor. Then come the network levels: level k of L =
  cfg.pyramid_levels fits the sequence downsampled by 2^(L-1-k)
  (:func:`sequence.downsample`) for cfg.coarse_steps Adam steps (cfg.steps at
  the full grid). sigma, ncc_sigma and velocity_sigma are scaled to each
  stage's grid, and with cfg.smt_order == 2 lambda_smt is divided by f^2, so
  the bending energy is weighed in the fit grid's pixels on every level (a
  second difference in a grid reduced f times reads f times larger; R_smt of
  order 1 and R_Jdet are scale-free); the NCC window keeps its size in pixels,
  so it covers more of the heart on the coarse grids. Each level adds a
  network, run at its own grid and upsampled (:func:`losses.velocity`); what
  the earlier stages fitted keeps training.
  With cfg.dense_steps > 0 a last stage at the full grid adds the free-form
  velocity (:mod:`echo_ode_jax.dense`) and fits it alone, the networks held
  fixed, for dense_steps Adam steps.
  """
  def at(f, steps):
    if f == 1 and steps == cfg.steps:
      return cfg
    smt = cfg.lambda_smt / f ** 2 if cfg.smt_order == 2 else cfg.lambda_smt
    return dataclasses.replace(cfg, steps=steps, sigma=cfg.sigma / f, ncc_sigma=cfg.ncc_sigma / f,
                               velocity_sigma=cfg.velocity_sigma / f, lambda_smt=smt)

  levels = cfg.pyramid_levels
  out = [(cfg.affine_factor, at(cfg.affine_factor, cfg.affine_steps))] if cfg.affine_steps else []
  for k in range(levels):
    f = 2 ** (levels - 1 - k)
    out.append((f, at(f, cfg.steps if f == 1 else cfg.coarse_steps)))
  if cfg.dense_steps:
    out.append((1, at(1, cfg.dense_steps)))
  return out


def member_keys(cfg: FitConfig, key) -> jax.Array:
  """The K = cfg.ensemble members' keys (K, 2): `key` itself, then fold_in(key, m)."""
  return jnp.stack([key] + [jax.random.fold_in(key, m) for m in range(1, cfg.ensemble)])


def level_state(cfg: FitConfig, level: int, key, shape_hw, prev: FitState | None = None
                ) -> FitState:
  """The state that starts stage `level` of cfg's :func:`pyramid`.

  A single-grid fit without the affine and dense stages: :func:`init_state`.
  Otherwise the parameters are a tuple: the previous stage's returned ones plus
  a new component: a network (fold_in(key, level); `key` itself for the one
  network of a single-grid fit, as :func:`init_state`), whose zero-initialised
  output layer makes the flow continue exactly where the previous stage left
  it; for the affine stage the zero :class:`affine.AffineVelocity`; for the
  dense stage the zero :class:`dense.DenseVelocity`. The optimizer starts
  afresh and a failure carries over.
  """
  if cfg.pyramid_levels == 1 and not cfg.affine_steps and not cfg.dense_steps:
    return init_state(cfg, key, shape_hw)
  stages = pyramid(cfg)
  level_cfg = stages[level][1]
  num_knots = len(flow.knot_times(cfg.solver, cfg.dt))
  if cfg.affine_steps and level == 0:
    new = affine.init(num_knots)
  elif cfg.dense_steps and level == len(stages) - 1:
    new = dense.init(num_knots, shape_hw, cfg.dense_factor)
  else:
    single = cfg.pyramid_levels == 1 and not cfg.affine_steps
    new = init_params(cfg.model, key if single else jax.random.fold_in(key, level), shape_hw)
  if prev is None:
    params, failed, fail_step = (new,), jnp.asarray(False), jnp.asarray(-1, jnp.int32)
  else:
    params = tuple(final_params(cfg, prev)) + (new,)
    failed, fail_step = prev.failed, prev.fail_step
  return FitState(params, _optimizer(level_cfg).init(params), failed, fail_step,
                  jax.tree_util.tree_map(jnp.array, params), jnp.asarray(jnp.inf, jnp.float32))


def final_params(cfg: FitConfig, state: FitState):
  """The parameters a fit returns: the best-loss ones (cfg.keep_best) or the last
  (of one member of an ensemble: vmap it over their stacked states)."""
  if cfg.keep_best:
    # best_loss stays inf only if the very first step failed; then params = init.
    return _select(jnp.isfinite(state.best_loss), state.best_params, state.params)
  return state.params


def steps_per_call(cfg: FitConfig) -> int:
  """Adam steps per compiled call: 1 on CPU (XLA:CPU runs convolutions inside a
  while loop far slower than at the top level; BENCHMARKS.md, "Steps per
  call"), so steps are dispatched from Python; elsewhere cfg.log_every steps in
  one lax.scan (no host round-trip inside the loop)."""
  return 1 if jax.default_backend() == "cpu" else max(1, cfg.log_every)


@functools.lru_cache(maxsize=32)
def _chunk_fn(cfg: FitConfig, n: int, batched: bool):
  """jit(n steps) of one sequence, or of a vmapped batch; state is donated."""
  step = make_step(cfg)
  if batched:
    step = jax.vmap(step, in_axes=(0, 0, None))

  if n == 1:
    def run(state, seq, start):
      state, terms = step(state, seq, start)
      return state, jax.tree_util.tree_map(lambda x: x[None], terms)
  else:
    def run(state, seq, start):
      return jax.lax.scan(lambda st, i: step(st, seq, i), state, start + jnp.arange(n))

  return jax.jit(run, donate_argnums=(0,), compiler_options=kernels.compiler_options())


@functools.lru_cache(maxsize=32)
def _final_fn(cfg: FitConfig, batched: bool):
  """jit: (state, seq) -> (phi (T,H,W,2), masks (T,H,W) uint8, folding fraction (T,),
  terms, member maps (K,T,H,W,2) or None).

  phi is the flow of the returned parameters (:func:`final_params`). With
  cfg.ensemble > 1 it is the flow of the members' mean velocity at the knot
  times, over the members that did not fail (all of them if every one did),
  and terms holds the loss terms and "loss"; otherwise terms is {}. With
  cfg.ensemble_fusion "labels" the masks fuse the members' soft m_0 o phi_k
  (weights those of the mean), whose maps are returned, and terms and folding
  are the weighted means of the members' own; else they are at phi.
  """
  apply_fn = _model(cfg).apply
  frames = lambda f: jax.vmap(f, (None, 0))
  fuse = cfg.ensemble > 1 and cfg.ensemble_fusion == "labels"

  def final(state, seq):
    terms, members = {}, None
    if cfg.ensemble > 1:
      params = jax.vmap(functools.partial(final_params, cfg))(state)
      knots = jax.vmap(lambda p: losses.velocity_knots(p, seq, cfg, apply_fn))(params)
      w = _kept_members(state.failed).astype(knots.dtype)
      w = w / jnp.sum(w)
      mean = lambda x: jnp.tensordot(w, x, axes=1)
      mean_knots = mean(knots)
      phi = losses.flow_of_knots(mean_knots, seq, cfg)
      if fuse:
        members = jax.vmap(lambda v: losses.flow_of_knots(v, seq, cfg))(knots)
        soft = mean(jax.vmap(lambda p: frames(warp_data)(seq["m0"], p))(members))
        fold = mean(jax.vmap(jax.vmap(folding_fraction))(members))
        terms = jax.tree_util.tree_map(mean, jax.vmap(
            lambda p, v: losses.terms_from_phi(p, seq, cfg, losses.inverse_maps(v, seq, cfg))
        )(members, knots))
      else:
        terms = losses.terms_from_phi(phi, seq, cfg, losses.inverse_maps(mean_knots, seq, cfg))
      terms["loss"] = losses.total_loss(terms, cfg)
    else:
      phi = losses.flow_batched(final_params(cfg, state), seq, cfg, apply_fn)
    if not fuse:
      soft = frames(warp_data)(seq["m0"], phi)
      fold = jax.vmap(folding_fraction)(phi)
    return phi, hard_labels(soft).astype(jnp.uint8), fold, terms, members

  return jax.jit(jax.vmap(final) if batched else final,
                 compiler_options=kernels.compiler_options())


def _members(phi) -> jnp.ndarray:
  """Maps (T, h, w, 2), or an ensemble's (K, T, h, w, 2), as (K, T, h, w, 2) float32."""
  phi = np.asarray(phi)
  if phi.ndim not in (4, 5) or phi.shape[-1] != 2:
    raise ValueError(f"phi: expected (T, h, w, 2) maps or (K, T, h, w, 2) members' maps, "
                     f"got shape {phi.shape}")
  return jnp.asarray(phi if phi.ndim == 5 else phi[None], jnp.float32)


@jax.jit
def _propagate(phis, m0, m_es):
  def soft(phi):
    big = flow.resample_map(phi, m0.shape)
    fwd = jax.vmap(lambda c: kernels.warp_labels(m0, c, NUM_CLASSES))(big)
    if m_es is None:
      return fwd
    inv_es = flow.invert_map(big[-1])
    psi = jax.vmap(lambda c: kernels.warp(inv_es, c))(big)        # phi_ES^-1 o phi_t
    bwd = jax.vmap(lambda c: kernels.warp_labels(m_es, c, NUM_CLASSES))(psi)
    w = jnp.linspace(0.0, 1.0, phi.shape[0])[:, None, None, None]
    return (1 - w) * fwd + w * bwd
  return hard_labels(jnp.mean(jax.vmap(soft)(phis), axis=0)).astype(jnp.uint8)


def propagate_labels(phi: np.ndarray, m0: np.ndarray, m_es: np.ndarray | None = None
                     ) -> np.ndarray:
  """Labels at every frame on m_0's own grid: (T, h, w, 2) maps of a fit grid (ED
  to ES, frames evenly spaced in time), (H, W) labels -> (T, H, W) uint8.

  The maps are resampled to the H x W grid (:func:`flow.resample_map`) and
  the one-hot m_0 is warped bilinearly there (m_0 o phi_t), so the contours are
  as fine as m_0's grid rather than nearest-upsampled fit-grid masks.

  With an ES mask m_es (H, W) the propagation is bidirectional
  (FitConfig.propagation): m_es is also carried back to every frame through
  the inverse of the ES map, m_es o phi_ES^-1 o phi_t (:func:`flow.invert_map`),
  and the two soft maps are mixed with weights 1 - t_k and t_k (t_k = k / (T - 1))
  before the argmax, so frame 0 is m_0 and the ES frame is m_es (up to
  interpolation) and both keyframe masks inform the frames between.

  phi may also be an ensemble's members' maps (K, T, h, w, 2)
  (FitResult.member_phi): their soft labels are averaged before the argmax
  (FitConfig.ensemble_fusion "labels").
  """
  m0 = np.asarray(m0)
  if m0.ndim != 2:
    raise ValueError(f"m0: expected (H, W) labels, got shape {m0.shape}")
  if m_es is not None and np.shape(m_es) != m0.shape:
    raise ValueError(f"m_es: shape {np.shape(m_es)} does not match m0 {m0.shape}")
  return np.asarray(_propagate(_members(phi), jnp.asarray(m0, jnp.int32),
                               None if m_es is None else jnp.asarray(m_es, jnp.int32)))


@jax.jit
def _consensus(phis, masks):
  def soft(phi):
    big = flow.resample_map(phi, masks.shape[1:])
    inv = jax.vmap(flow.invert_map)(big)                        # phi_k^-1
    at_ed = jax.vmap(lambda m, c: kernels.warp_labels(m, c, NUM_CLASSES))(masks, inv)
    m0_soft = jnp.mean(at_ed, axis=0)                           # (H, W, C)
    return jax.vmap(lambda c: kernels.warp(m0_soft, c))(big)
  return hard_labels(jnp.mean(jax.vmap(soft)(phis), axis=0)).astype(jnp.uint8)


def consensus_labels(phi: np.ndarray, masks: np.ndarray) -> np.ndarray:
  """Labels at every frame from a segmentation of every frame, fused through the flow.

  phi: (T, h, w, 2) maps of a fit grid (ED to ES); masks: (T, H, W) labels of
  the same T frames (a 2D segmenter's, on the data grid) -> (T, H, W) uint8.
  Each frame's mask is carried to ED through the inverse of its map,
  masks_k o phi_k^-1 (:func:`flow.invert_map`, one-hot, bilinear), the T soft
  maps are averaged into one ED mask, and that is carried to every frame
  through phi_t (FitConfig.propagation="consensus"). The result is one mask
  moved by the flow, as temporally consistent as forward propagation, and it
  uses every frame's segmentation (label fusion, as in multi-atlas
  segmentation) instead of the ED frame's alone. An ensemble's members' maps
  (K, T, h, w, 2) are fused as in :func:`propagate_labels`.
  """
  masks = np.asarray(masks)
  phis = _members(phi)
  if masks.ndim != 3 or masks.shape[0] != phis.shape[1]:
    raise ValueError(f"masks: expected ({phis.shape[1]}, H, W) labels for {phis.shape[1]} "
                     f"maps, got shape {masks.shape}")
  return np.asarray(_consensus(phis, jnp.asarray(masks, jnp.int32)))


def labels_from_maps(propagation: str, phi: np.ndarray, m0: np.ndarray,
                     m_es: np.ndarray | None = None, masks: np.ndarray | None = None
                     ) -> np.ndarray:
  """The masks of FitConfig.propagation on m_0's grid: "forward" m_0 o phi_t and
  "bidirectional" with m_es (:func:`propagate_labels`), "consensus" from the
  masks of every frame (:func:`consensus_labels`). phi: (T, h, w, 2), or an
  ensemble's members' maps (K, T, h, w, 2), whose labels are fused."""
  if propagation == "consensus":
    return consensus_labels(phi, masks)
  if propagation == "bidirectional":
    return propagate_labels(phi, m0, m_es)
  if propagation == "forward":
    return propagate_labels(phi, m0)
  raise ValueError(f"propagation must be one of {', '.join(PROPAGATIONS)}, got {propagation!r}")


def _run_chunks(cfg, states, seqs, steps, batched, progress, what, offset=0):
  """Runs `steps` Adam steps of each (state, seq) pair, interleaved.

  Several pairs are the CPU "loop" batch mode: every step dispatches the same
  compiled program once per pair (asynchronously), so they overlap on
  different devices. Steps are numbered from `offset` (a failure's step).
  Returns (states, histories), one per pair.
  """
  cpu_malloc.hint()
  per_call = min(steps_per_call(cfg), steps)
  fns = {}
  hists = [[] for _ in states]   # device arrays; fetched at the end
  states = list(states)
  done = 0
  last_log = 0
  prog = Progress(steps, what, "step") if progress else None
  while done < steps:
    n = min(per_call, steps - done)
    if n not in fns:
      fns[n] = _chunk_fn(cfg, n, batched)
    start = jnp.int32(offset + done)
    for j, seq in enumerate(seqs):
      states[j], terms = fns[n](states[j], seq, start)
      hists[j].append(terms)
    done += n
    if prog and (done - last_log >= cfg.log_every or done == steps):
      loss = np.concatenate([np.ravel(jax.device_get(h[-1]["loss"])[-1]) for h in hists])
      prog.update(done - last_log, extra=f"loss {np.nanmean(loss):.4g}")
      last_log = done
  histories = []
  for hist in jax.device_get(hists):
    histories.append({k: np.concatenate([h[k] for h in hist], axis=0) for k in hist[0]})
  return states, histories


def _kept_members(failed):
  """The members an ensemble keeps: those that did not fail, all if every one
  did. failed: (K,) bool (numpy or jax)."""
  return failed == failed.all()


def _result(phi, masks, fold, seq, history, failed, fail_step, seconds,
            keep_best=False, offset=0, terms=None, members=None) -> FitResult:
  """One sequence's FitResult. failed / fail_step: scalars, or (K,) for an
  ensemble's members (history's terms then (steps, K)), whose `terms` are its
  final terms and `members` (K, T, H, W, 2) its members' maps (label fusion)."""
  t_valid = int(seq["es_index"]) + 1
  failed, fail_step = np.asarray(failed), np.asarray(fail_step)
  best = -1
  if failed.ndim:     # an ensemble: it fails only if every member failed
    kept = _kept_members(failed)
    if members is not None:
      members = np.asarray(members, np.float32)[kept, :t_valid]
    history = {k: np.mean(np.asarray(v)[..., kept], axis=-1) for k, v in history.items()}
    final = {k: float(v) for k, v in terms.items()}
    reason = ""
    if failed.any():
      reason = (f"{int(failed.sum())} of {failed.size} ensemble members: non-finite loss or "
                f"gradient (first at step {int(fail_step[failed].min())})")
    failed = failed.all()
  else:
    final = {k: float(v[-1]) for k, v in history.items()}
    if keep_best:
      # The terms of the returned (best-loss) parameters: candidates are the steps
      # of the last level (from `offset`) before any failure (not applied).
      loss = np.asarray(history["loss"], np.float64)
      n = int(fail_step) if failed else loss.size
      ok = np.isfinite(loss[offset:n])
      if ok.any():
        best = offset + int(np.argmin(np.where(ok, loss[offset:n], np.inf)))
        final = {k: float(v[best]) for k, v in history.items()}
    reason = f"non-finite loss or gradient at step {int(fail_step)}" if failed else ""
  return FitResult(np.asarray(masks[:t_valid]), np.asarray(phi[:t_valid], np.float32),
                   history, final, float(np.mean(fold[:t_valid])), seconds, bool(failed),
                   reason, best, members)


def _fit_levels(cfg, keys, seqs, batched, progress, what, puts=None):
  """Runs every level of cfg's pyramid on (key, seq) pairs (batched: each pair
  a stacked batch of keys and sequences); puts: per pair, places a new state's
  arrays and each level's sequence, so sequences may be passed on the host
  (default jnp.asarray). Returns (states, histories over all levels, offset of
  the last level's first step)."""
  puts = puts or [jnp.asarray] * len(seqs)
  if cfg.ensemble > 1:
    return _fit_members(cfg, keys, seqs, batched, progress, what, puts)

  def start(level, key, hw, prev):
    if batched:
      return jax.vmap(lambda k, p: level_state(cfg, level, k, hw, p))(key, prev)
    return level_state(cfg, level, key, hw, prev)

  states = [None] * len(seqs)
  hists = [[] for _ in seqs]
  offset = 0
  levels = pyramid(cfg)
  for level, (f, level_cfg) in enumerate(levels):
    level_seqs = [jax.tree_util.tree_map(put, downsample(s, f, level_cfg.sigma))
                  for s, put in zip(seqs, puts)]
    hw = level_seqs[0]["images"].shape[-2:]
    states = [jax.tree_util.tree_map(put, start(level, k, hw, st))
              for k, st, put in zip(keys, states, puts)]
    label = what if len(levels) == 1 else f"{what}, level {level + 1}/{len(levels)} ({hw[0]}x{hw[1]})"
    states, level_hists = _run_chunks(level_cfg, states, level_seqs, level_cfg.steps, batched,
                                      progress, label, offset)
    for h, lh in zip(hists, level_hists):
      h.append(lh)
    offset += level_cfg.steps
  offset -= levels[-1][1].steps
  histories = [{k: np.concatenate([lh[k] for lh in h], axis=0) for k in h[0]} for h in hists]
  return states, histories, offset


def _fit_members(cfg, keys, seqs, batched, progress, what, puts):
  """_fit_levels for an ensemble: its K members are fitted as K more sequences
  (the same compiled programs as a single fit), then regrouped, each pair's
  states stacked along a leading member axis and its history terms (steps, K)
  ((steps, B, K) when batched)."""
  k, single = cfg.ensemble, cfg.replace(ensemble=1)
  if batched:   # member m of sequence i is sequence i * K + m of its pair's batch
    mkeys = [put(jax.vmap(functools.partial(member_keys, cfg))(key).reshape(-1, *key.shape[1:]))
             for key, put in zip(keys, puts)]
    mseqs = [jax.tree_util.tree_map(lambda x: np.repeat(np.asarray(x), k, axis=0), s)
             for s in seqs]
    states, hists, offset = _fit_levels(single, mkeys, mseqs, True, progress, what, puts)
    states = [jax.tree_util.tree_map(lambda x: x.reshape(-1, k, *x.shape[1:]), st)
              for st in states]
    hists = [{n: v.reshape(v.shape[0], -1, k) for n, v in h.items()} for h in hists]
    return states, hists, offset
  mkeys = [m for key in keys for m in member_keys(cfg, key)]
  states, hists, offset = _fit_levels(single, mkeys, [s for s in seqs for _ in range(k)],
                                      False, progress, what, [p for p in puts for _ in range(k)])
  groups = [slice(i * k, (i + 1) * k) for i in range(len(seqs))]
  states = [jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states[g]) for g in groups]
  hists = [{n: np.stack([h[n] for h in hists[g]], -1) for n in hists[0]} for g in groups]
  return states, hists, offset


def fit_sequence(seq: dict[str, np.ndarray], cfg: FitConfig = FitConfig(), key=None,
                 progress: bool = False) -> FitResult:
  """Fits one prepared sequence (see :func:`prepare_sequence`)."""
  t0 = time.perf_counter()
  key = jax.random.PRNGKey(cfg.seed) if key is None else key
  seq = jax.tree_util.tree_map(jnp.asarray, seq)
  (state,), (history,), offset = _fit_levels(cfg, [key], [seq], False, progress, "fit")
  phi, masks, fold, terms, members = jax.device_get(_final_fn(cfg, False)(state, seq))
  return _result(phi, masks, fold, jax.device_get(seq), history, state.failed,
                 state.fail_step, time.perf_counter() - t0, cfg.keep_best, offset, terms,
                 members)


def batch_mesh(devices=None) -> Mesh:
  """A 1-D mesh over `devices` (default: all local devices) with axis "batch"."""
  devices = jax.local_devices() if devices is None else devices
  return Mesh(np.asarray(devices), ("batch",))


def fit_batch(seqs: Seq[dict[str, np.ndarray]], cfg: FitConfig = FitConfig(), keys=None,
              mesh: Mesh | None = None, progress: bool = False,
              batch_mode: str | None = None) -> list[FitResult]:
  """Fits B independent sequences with one compiled program per chunk of steps.

  Sequences are padded to a common T (the longest, rounded to cfg.t_bucket).
  In "vmap" mode each device of the mesh fits a share of ceil(B / n)
  sequences stacked along a batch axis, the last share padded with copies of
  the last sequence (their results are dropped); every share runs the same
  program.

  Args:
    seqs: prepared sequences (:func:`prepare_sequence`), same H, W.
    keys: B PRNG keys (default: fold_in(PRNGKey(cfg.seed), i)). A sequence fitted
      alone with the same key gives the same result.
    batch_mode: "vmap" (one program over each device's stacked share of the
      batch) or "loop" (the single-sequence program per sequence, placed round
      robin on the mesh's devices); default "loop" (see the module docstring).
  """
  t0 = time.perf_counter()
  b = len(seqs)
  if b == 0:
    return []
  batch_mode = batch_mode or "loop"
  if batch_mode not in ("vmap", "loop"):
    raise ValueError(f"batch_mode must be 'vmap' or 'loop', got {batch_mode!r}")
  t_pad = max(s["images"].shape[0] for s in seqs)
  seqs = [_repad(s, t_pad) for s in seqs]   # one compiled program for the batch
  if keys is None:
    keys = [jax.random.fold_in(jax.random.PRNGKey(cfg.seed), i) for i in range(b)]
  if batch_mode == "loop":
    return _fit_loop(seqs, cfg, list(keys), mesh, progress, t0)
  devices = list(mesh.devices.flat) if mesh is not None else [None]
  per = -(-b // len(devices))   # sequences per device; the last share is padded
  seqs = list(seqs) + [seqs[-1]] * (per * len(devices) - b)
  keys = list(keys) + [keys[-1]] * (per * len(devices) - b)
  shares = [slice(g * per, (g + 1) * per) for g in range(len(devices)) if g * per < b]
  puts = [_placer(d) for d in devices[:len(shares)]]
  batches = [stack(seqs[g]) for g in shares]   # on the host; _fit_levels places them
  states, histories, offset = _fit_levels(
      cfg, [put(jnp.stack(keys[g])) for g, put in zip(shares, puts)], batches, True, progress,
      f"fit batch of {b}", puts)
  final = _final_fn(cfg, True)
  outs = jax.device_get([final(st, jax.tree_util.tree_map(put, bt))
                         for st, bt, put in zip(states, batches, puts)])
  seconds = time.perf_counter() - t0
  results = []
  for (phi, masks, fold, terms, members), st, hist, bt in zip(outs, states, histories, batches):
    failed, fail_step = np.asarray(st.failed), np.asarray(st.fail_step)
    results += [_result(phi[i], masks[i], fold[i], {"es_index": bt["es_index"][i]},
                        {k: v[:, i] for k, v in hist.items()}, failed[i], fail_step[i],
                        seconds / b, cfg.keep_best, offset, {k: v[i] for k, v in terms.items()},
                        None if members is None else members[i])
                for i in range(per)]
  return results[:b]


def _placer(device):
  """x -> x on `device` (None: jnp.asarray, the default device)."""
  return jnp.asarray if device is None else functools.partial(jax.device_put, device=device)


def _fit_loop(seqs, cfg, keys, mesh, progress, t0) -> list[FitResult]:
  """fit_batch's "loop" mode: one single-sequence program per sequence and step.

  seqs: already padded to one T; keys: one per sequence.
  """
  b = len(seqs)
  devices = list(mesh.devices.flat) if mesh is not None else [None]
  puts, dev_seqs = [], []
  for i, s in enumerate(seqs):
    put = _placer(devices[i % len(devices)])
    puts.append(put)
    dev_seqs.append(jax.tree_util.tree_map(put, s))
  states, histories, offset = _fit_levels(cfg, keys, dev_seqs, False, progress,
                                          f"fit batch of {b}", puts)
  final = _final_fn(cfg, False)
  outs = jax.device_get([final(st, s) for st, s in zip(states, dev_seqs)])
  seconds = time.perf_counter() - t0
  return [_result(phi, masks, fold, {"es_index": s["es_index"]}, h, st.failed, st.fail_step,
                  seconds / b, cfg.keep_best, offset, terms, members)
          for (phi, masks, fold, terms, members), s, h, st in zip(outs, seqs, histories, states)]
