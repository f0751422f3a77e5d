"""Semi-synthetic full-cycle sequences from real ED/ES pairs (e.g. CAMUS).

For one view with an ED image I_ED, an ED mask m_ED and an ES mask m_ES (all
on the stored S x S grid, see convert.to_sequence), a stationary velocity
field v is fitted so that its flow carries the ED structures onto the ES ones:

  phi_s = exp(s v)     (pull-back maps, absolute (row, col) pixels)

computed by scaling and squaring: phi = id + u with u = s v / 2^N, then N
times u <- u + u o (id + u) (bilinear sampling, border padding). v lives on a
coarse G x G control grid (pixels per unit s) and is upsampled to S x S by a
fixed cubic interpolation, so it is smooth; phi_s is then a diffeomorphism
(checked: the minimum Jacobian determinant is stored).

Fit: Adam (optax) on the control values, minimising, per structure (LV cavity
= label 1, LV epicardium = labels 1|2, LA = label 3), the mean squared
difference between the clipped signed distance map of the ED mask pulled back
by phi_1 and that of the ES mask (in units of the clip distance), plus a
smoothness penalty (mean squared first differences of v, in pixels) and a
small penalty on |v|^2.

Frame k of T (T random in synthetic.DEFAULT_FRAMES per patient, seeded) is at
s_k = synthetic.time_profile(k / (T - 1), gamma), monotone from 0 (ED) to 1
(ES), with a per-patient gamma; then

  img[k](p) = sector(p) * clip(I_ED(phi_k(p)) * speckle_k(p) + noise_k(p), 0, 1)
  gt[k](p)  = argmax_c onehot(m_ED)_c(phi_k(p))       (bilinear one-hot, argmax)

(I_ED extended beyond the fan by its nearest values first, fill_outside) with
fresh multiplicative speckle (normalised Rayleigh amplitude of a slightly
smoothed complex Gaussian field, as in synthetic.py) and additive Gaussian
noise per frame; sector = the real ED image's field of view, so pixels outside
it stay 0. phi_0 = identity, so gt[0] = m_ED and, without noise, img[0] = I_ED.
The synthetic ES mask gt[T-1] is compared with the real ES mask (Dice of the
LV cavity "endo", epicardium "epi", myocardium "myo" and LA "la"), so each
sequence says how realistic its motion is.

Outputs: the project's HDF5 layout (hdf5.py) with `flow_true` (T, S, S, 2)
float32 (gt[t](p) = gt[0](flow_true[t, p])) and every frame annotated, and
optionally the CAMUS 2023 NIfTI layout (half sequence, its _gt, ED/ES frames
and masks, Info_4CH.cfg) on the stored grid, which the CAMUS converter reads.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Sequence as Seq

import h5py
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import optax
from absl import logging
from scipy import ndimage

from echo_ode_jax._atomic import atomic_path
from echo_ode_jax._progress import Progress
from echo_ode_jax.data import camus, synthetic
from echo_ode_jax.data.convert import _select, to_sequence
from echo_ode_jax.data.hdf5 import (UNANNOTATED, Sequence, set_root_attrs, write_dataset,
                                    write_sequence)
from echo_ode_jax.errors import InputError
from echo_ode_jax.kernels import warp, warp_data, warp_labels
from echo_ode_jax.metrics._deformation import jacobian_determinant_np
from echo_ode_jax.metrics._dice import LABEL_STRUCTURES, dice

#: Structures fitted, as label sets: LV cavity, LV epicardium, LA.
FIT_STRUCTURES = ((1,), (1, 2), (3,))
#: Structures reported (Dice of the synthetic ES mask against the real one).
DICE_STRUCTURES = LABEL_STRUCTURES
NUM_LABELS = 4


@dataclasses.dataclass(frozen=True)
class MapConfig:
  """Settings of the ED -> ES map fit.

  grid: control grid side G (v is G x G x 2, upsampled to S x S).
  steps: Adam steps; lr: peak learning rate (pixels per step, cosine decay to lr/10).
  squarings: N of scaling and squaring (u = v / 2^N).
  clip: signed distances are clipped at max(clip * S / 128, 2) pixels (small: the
    data term concentrates on the boundaries).
  smooth: weight of the mean squared first differences of v (pixels^2).
  magnitude: weight of the mean |v|^2 (pixels^2 at S = 128).
  bending: weight of the mean squared second differences of v (bending energy,
    pixels^2 per pixel^2 at S = 128; affine motion is free of it).
  """
  grid: int = 16
  steps: int = 300
  lr: float = 0.5
  squarings: int = 7
  clip: float = 4.0
  smooth: float = 0.05
  magnitude: float = 1e-4
  bending: float = 0.0


@dataclasses.dataclass(frozen=True)
class NoiseConfig:
  """Per-frame image noise: speckle (0: none) is the strength of the multiplicative
  normalised Rayleigh factor 1 + speckle (|z| / E|z| - 1); sigma the smoothing of
  the complex field in pixels at S = 128; noise the std of the additive Gaussian."""
  speckle: float = 0.3
  sigma: float = 0.7
  noise: float = 0.02


# ---------------------------------------------------------------------------
# The map: v on a control grid, phi_s = exp(s v)
# ---------------------------------------------------------------------------


def upsample_matrix(grid: int, size: int) -> np.ndarray:
  """(size, grid) cubic (Keys) interpolation matrix: v_full = U v_c U^T per component.

  Control point j sits at pixel (j + 0.5) * size / grid - 0.5 (cell centres).
  """
  with jax.default_device(jax.devices("cpu")[0]):
    m = jax.image.resize(jnp.eye(grid, dtype=jnp.float32), (size, grid), "cubic")
  return np.asarray(m, np.float32)


def velocity_full(v_c, up):
  """(G, G, 2) control values -> (S, S, 2) velocity (pixels), up: (S, G)."""
  return jnp.einsum("ia,abc,jb->ijc", up, v_c, up)


def identity_grid(size: int) -> np.ndarray:
  """(S, S, 2) absolute (row, col) pixel positions."""
  r = np.arange(size, dtype=np.float32)
  return np.stack(np.meshgrid(r, r, indexing="ij"), axis=-1)


def exp_map(v, squarings: int):
  """phi = exp(v): (S, S, 2) velocity (pixels) -> (S, S, 2) absolute pull-back map.

  Scaling and squaring with bilinear composition, border padding; differentiable.
  """
  size = v.shape[0]
  ident = jnp.asarray(identity_grid(size))
  u = v / (2.0 ** squarings)
  for _ in range(squarings):
    u = u + warp(u, ident + u, "border", image_grad=True)
  return ident + u


def signed_distance(mask: np.ndarray, clip: float) -> np.ndarray:
  """(S, S) bool -> float32 signed distance in pixels (negative inside), clipped to ±clip.

  An empty mask gives +clip everywhere, a full one -clip.
  """
  mask = np.asarray(mask, bool)
  if not mask.any():
    return np.full(mask.shape, clip, np.float32)
  if mask.all():
    return np.full(mask.shape, -clip, np.float32)
  d = ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)
  return np.clip(d, -clip, clip).astype(np.float32)


def _sdm_stack(labels: np.ndarray, clip: float) -> np.ndarray:
  """(S, S) labels -> (S, S, K) clipped signed distances of FIT_STRUCTURES."""
  return np.stack([signed_distance(np.isin(labels, s), clip) for s in FIT_STRUCTURES], -1)


def _clip_px(cfg: MapConfig, size: int) -> float:
  return max(cfg.clip * size / 128.0, 2.0)


@functools.lru_cache(maxsize=8)
def _fit_fn(size: int, cfg: MapConfig):
  up = jnp.asarray(upsample_matrix(cfg.grid, size))
  sched = optax.cosine_decay_schedule(cfg.lr, cfg.steps, alpha=0.1)
  opt = optax.adam(sched)
  clip = _clip_px(cfg, size)

  def loss_fn(v_c, sdm_ed, sdm_es, weight):
    v = velocity_full(v_c, up)
    phi = exp_map(v, cfg.squarings)
    warped = warp_data(sdm_ed, phi, "border")
    data = jnp.mean(weight * jnp.mean(((warped - sdm_es) / clip) ** 2, axis=(0, 1)))
    smooth = (jnp.mean((v[1:] - v[:-1]) ** 2) + jnp.mean((v[:, 1:] - v[:, :-1]) ** 2))
    mag = jnp.mean(v ** 2)
    bend = (jnp.mean((v[2:] - 2 * v[1:-1] + v[:-2]) ** 2)
            + jnp.mean((v[:, 2:] - 2 * v[:, 1:-1] + v[:, :-2]) ** 2)
            + 2 * jnp.mean((v[1:, 1:] - v[1:, :-1] - v[:-1, 1:] + v[:-1, :-1]) ** 2))
    return (data + cfg.smooth * smooth + cfg.bending * bend * (size / 128.0) ** 2
            + cfg.magnitude * mag * (128.0 / size) ** 2), data

  def fit(sdm_ed, sdm_es, weight):
    v0 = jnp.zeros((cfg.grid, cfg.grid, 2), jnp.float32)

    def step(carry, _):
      v_c, st = carry
      (loss, data), g = jax.value_and_grad(loss_fn, has_aux=True)(v_c, sdm_ed, sdm_es, weight)
      upd, st = opt.update(g, st, v_c)
      return (optax.apply_updates(v_c, upd), st), (loss, data)

    (v_c, _), (losses, datas) = jax.lax.scan(step, (v0, opt.init(v0)), None, length=cfg.steps)
    loss, data = loss_fn(v_c, sdm_ed, sdm_es, weight)
    return v_c, loss, data, losses

  return jax.jit(fit)


@dataclasses.dataclass
class FittedMap:
  """A fitted stationary velocity: v (S, S, 2) pixels per unit s; control (G, G, 2).

  loss / data_loss: final objective and its data term; losses: (steps,) history.
  """
  v: np.ndarray
  control: np.ndarray
  squarings: int
  loss: float
  data_loss: float
  losses: np.ndarray

  def phi(self, s: float | np.ndarray) -> np.ndarray:
    """Pull-back maps exp(s v): (S, S, 2) for a scalar s, (K, S, S, 2) for (K,) s; float32."""
    s_arr = np.asarray(s, np.float32)
    flat = s_arr.reshape(-1)
    n = len(flat)
    padded = np.zeros(-(-n // 8) * 8, np.float32)   # a few shapes, a few compilations
    padded[:n] = flat
    out = _exp_batch(self.squarings)(np.asarray(self.v, np.float32), padded)
    out = np.array(out[:n], np.float32)
    return out[0] if s_arr.ndim == 0 else out


@functools.lru_cache(maxsize=8)
def _exp_batch(squarings: int):
  return jax.jit(jax.vmap(lambda v, s: exp_map(s * v, squarings), in_axes=(None, 0)))


def fit_map(m_ed: np.ndarray, m_es: np.ndarray, cfg: MapConfig = MapConfig()) -> FittedMap:
  """Fits v so that m_ED(exp(v)(p)) matches m_ES(p) (signed distances of FIT_STRUCTURES).

  Args:
    m_ed, m_es: (S, S) uint8 labels (0 bg, 1 LV, 2 myo, 3 LA) on the same square grid.
    cfg: the fit settings.

  A structure absent from either mask is left out of the data term.
  """
  m_ed = np.asarray(m_ed)
  m_es = np.asarray(m_es)
  if m_ed.shape != m_es.shape or m_ed.ndim != 2 or m_ed.shape[0] != m_ed.shape[1]:
    raise ValueError(f"fit_map: need two (S, S) masks, got {m_ed.shape} and {m_es.shape}")
  size = m_ed.shape[0]
  clip = _clip_px(cfg, size)
  weight = np.array([float(np.isin(m_ed, s).any() and np.isin(m_es, s).any())
                     for s in FIT_STRUCTURES], np.float32)
  v_c, loss, data, losses = _fit_fn(size, cfg)(_sdm_stack(m_ed, clip), _sdm_stack(m_es, clip),
                                               weight)
  v_c = np.asarray(v_c, np.float32)
  up = upsample_matrix(cfg.grid, size)
  v = np.einsum("ia,abc,jb->ijc", up, v_c, up).astype(np.float32)
  return FittedMap(v, v_c, cfg.squarings, float(loss), float(data), np.asarray(losses))


# ---------------------------------------------------------------------------
# Warping data with a map
# ---------------------------------------------------------------------------


def pull_back_image(img: np.ndarray, phi: np.ndarray) -> np.ndarray:
  """(S, S) image sampled bilinearly at phi (..., S, S, 2) (border padding) -> (..., S, S)."""
  phi = np.asarray(phi, np.float32)
  flat = phi.reshape((-1,) + phi.shape[-3:])
  f = jax.vmap(lambda c: warp_data(np.asarray(img, np.float32)[..., None], c, "border")[..., 0])
  return np.asarray(f(flat)).reshape(phi.shape[:-1])


def pull_back_labels(labels: np.ndarray, phi: np.ndarray,
                     num_labels: int = NUM_LABELS) -> np.ndarray:
  """(S, S) labels pulled back by phi (..., S, S, 2): argmax of the bilinear one-hot, uint8."""
  phi = np.asarray(phi, np.float32)
  flat = phi.reshape((-1,) + phi.shape[-3:])
  lab = jnp.asarray(np.asarray(labels, np.int32))
  f = jax.vmap(lambda c: jnp.argmax(warp_labels(lab, c, num_labels, "border"), -1))
  return np.asarray(f(flat), np.uint8).reshape(phi.shape[:-1])


def sector_of(img: np.ndarray) -> np.ndarray:
  """(S, S) bool field of view of an ultrasound frame: nonzero pixels, holes filled."""
  m = np.asarray(img) > 0
  m = ndimage.binary_closing(m, iterations=2, border_value=0) | m
  return ndimage.binary_fill_holes(m)


def fill_outside(img: np.ndarray, sector: np.ndarray) -> np.ndarray:
  """(S, S) image with each pixel outside `sector` set to its nearest pixel inside.

  Warping the filled image keeps the black outside of the fan from being pulled
  into it where the map samples just beyond the fan's edge.
  """
  img = np.asarray(img)
  if sector.all() or not sector.any():
    return img.copy()
  _, (ri, ci) = ndimage.distance_transform_edt(~sector, return_indices=True)
  return img[ri, ci]


def frame_noise(rng: np.random.Generator, shape: tuple[int, int],
                cfg: NoiseConfig) -> tuple[np.ndarray, np.ndarray]:
  """(multiplicative factor, additive term), each (S, S) float32, fresh draws from rng."""
  size = max(shape)
  if cfg.speckle > 0:
    z = synthetic._complex_field(rng, shape, cfg.sigma * size / 128.0)
    mult = 1.0 + cfg.speckle * (np.abs(z) / (np.sqrt(np.pi) / 2.0) - 1.0)
  else:
    mult = np.ones(shape)
  add = cfg.noise * rng.standard_normal(shape) if cfg.noise > 0 else np.zeros(shape)
  return mult.astype(np.float32), add.astype(np.float32)


# ---------------------------------------------------------------------------
# One sequence
# ---------------------------------------------------------------------------


def patient_seed(seed: int, patient: str) -> np.random.Generator:
  """The random generator of one patient: depends on the seed and the name only."""
  return np.random.default_rng([int(seed), zlib.crc32(patient.encode())])


def area_ef(gt_ed: np.ndarray, gt_es: np.ndarray) -> float:
  """1 - A_ES / A_ED of the LV cavity (label 1) in pixels; nan without an ED cavity."""
  a_ed = int(np.sum(gt_ed == 1))
  return float("nan") if a_ed == 0 else 1.0 - int(np.sum(gt_es == 1)) / a_ed


def es_dice(synth_es: np.ndarray, real_es: np.ndarray) -> dict[str, float]:
  """Dice of the synthetic ES mask against the real one per DICE_STRUCTURES name."""
  return {k: dice(np.isin(synth_es, s), np.isin(real_es, s)) for k, s in DICE_STRUCTURES.items()}


def semisynthetic_sequence(
    ed_es: Sequence, seed: int = 0, num_frames: int | None = None,
    map_cfg: MapConfig = MapConfig(), noise_cfg: NoiseConfig = NoiseConfig(),
    gamma: float | None = None) -> tuple[Sequence, np.ndarray, dict[str, Any]]:
  """A full ED -> ES sequence from a two-frame stored sequence (real ED and ES).

  Args:
    ed_es: a Sequence with img (T0, S, S) in [0, 1] and gt (T0, S, S) whose
      first frame is ED and last ES, both annotated (e.g. convert.to_sequence
      of a CAMUS view); its attrs (voxelspacing, resampling) are kept.
    seed: with the patient name, seeds T, gamma and the noise (patient_seed).
    num_frames: T >= 2; default random in synthetic.DEFAULT_FRAMES.
    map_cfg, noise_cfg: the map fit and the image noise.
    gamma: exponent of the time profile; default random in [0.7, 0.9].

  Returns:
    (seq, phi, report): seq.img (T, S, S) float32 in [0, 1], seq.gt (T, S, S)
    uint8 (all frames annotated), attrs with ed_index 0, es_index T-1, ed 1,
    es T, nbframe T, ef_true (area EF of the synthetic cavity), ef_real_area,
    es_dice_{endo,epi,myo,la}, jdet_min, time_gamma, time_s (T,) (the s_k of
    phi[k] = exp(s_k v)), fit_loss, fit_data_loss, seed, semisynthetic 1;
    phi (T, S, S, 2) float32 pull-back maps, phi[0] = identity;
    report: the per-sequence numbers (patient, frames, Dice, EFs, jdet_min, fit loss, seconds).
  """
  t0 = time.perf_counter()
  img0, gt0 = np.asarray(ed_es.img), ed_es.gt
  if gt0 is None or img0.ndim != 3 or img0.shape[0] < 2 or gt0.shape != img0.shape:
    raise ValueError(f"{ed_es.key}: need img and gt (T0 >= 2, S, S) with ED first and ES last")
  m_ed, m_es = np.asarray(gt0[0]), np.asarray(gt0[-1])
  if np.any(m_ed == 255) or np.any(m_es == 255):
    raise ValueError(f"{ed_es.key}: the ED and ES frames must be annotated")
  size = img0.shape[1]
  rng = patient_seed(seed, ed_es.patient)
  lo, hi = synthetic.DEFAULT_FRAMES
  t_frames = int(rng.integers(lo, hi + 1)) if num_frames is None else int(num_frames)
  if t_frames < 2:
    raise ValueError(f"num_frames must be >= 2, got {num_frames}")
  g = float(rng.uniform(0.7, 0.9)) if gamma is None else float(gamma)
  s = synthetic.time_profile(np.arange(t_frames) / (t_frames - 1), g).astype(np.float32)

  fitted = fit_map(m_ed, m_es, map_cfg)
  phi = fitted.phi(s)
  phi[0] = identity_grid(size)                    # exp(0) is the identity exactly
  gt = pull_back_labels(m_ed, phi)
  sector = sector_of(img0[0])
  clean = pull_back_image(fill_outside(img0[0], sector), phi)
  img = np.empty_like(clean)
  for k in range(t_frames):
    mult, add = frame_noise(rng, (size, size), noise_cfg)
    img[k] = np.clip(clean[k] * mult + add, 0.0, 1.0) * sector
  jdet_min = float(jacobian_determinant_np(phi[1:]).min()) if t_frames > 1 else 1.0
  dices = es_dice(gt[-1], m_es)

  attrs = dict(ed_es.attrs)
  attrs.update({
      "ed_index": 0, "es_index": t_frames - 1,
      "ed": 1, "es": t_frames, "nbframe": t_frames,
      "ef_true": area_ef(gt[0], gt[-1]),
      "ef_real_area": area_ef(m_ed, m_es),
      "time_gamma": g, "time_s": s.astype(np.float64), "seed": int(seed), "jdet_min": jdet_min,
      "fit_loss": fitted.loss, "fit_data_loss": fitted.data_loss,
      "semisynthetic": 1,
  })
  attrs.update({f"es_dice_{k}": v for k, v in dices.items()})
  seq = Sequence(ed_es.patient, ed_es.view, img.astype(np.float32), gt, attrs)
  report = {"patient": ed_es.patient, "view": ed_es.view, "frames": t_frames,
            **{f"dice_{k}": v for k, v in dices.items()},
            "ef_real_area": attrs["ef_real_area"], "ef_synth_area": attrs["ef_true"],
            "jdet_min": jdet_min, "fit_data_loss": fitted.data_loss,
            "seconds": time.perf_counter() - t0}
  return seq, phi.astype(np.float32), report


# ---------------------------------------------------------------------------
# Files: CAMUS in, HDF5 (and CAMUS-layout NIfTI) out
# ---------------------------------------------------------------------------


def select_patients(camus_dir: str | os.PathLike, patients: Seq[str] | None = None,
                    splits: str | os.PathLike | None = None, split: str = "valid",
                    num: int | None = None) -> list[Path]:
  """Patient folders under `camus_dir` (camus.find_patients), narrowed down.

  patients: names (patient0001 or 1); splits/split: keep the patients of one list
  of a splits JSON ({"train": [...], "valid": [...]}); num: the first `num` left.
  Raises InputError on a missing patient, split or file.
  """
  folders = _select(camus.find_patients(camus_dir), patients, camus_dir)
  if splits is not None:
    try:
      data = json.loads(Path(splits).read_text())
    except (OSError, ValueError) as e:
      raise InputError(splits, f"cannot read the splits JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get(split), list):
      raise InputError(splits, f"no list {split!r} (keys: {sorted(data) if isinstance(data, dict) else []})")
    keep = set(data[split])
    folders = [d for d in folders if d.name in keep]
  if num is not None:
    if num < 1:
      raise InputError(None, f"--num must be >= 1, got {num}")
    folders = folders[:num]
  if not folders:
    raise InputError(camus_dir, "no patients selected")
  return folders


def write_nifti(path: str | os.PathLike, arr: np.ndarray, spacing: tuple[float, float]) -> None:
  """Writes (H, W) or (T, H, W) (rows = depth) as CAMUS NIfTI: (x, y[, t]), spacing (row, col) mm."""
  arr = np.asarray(arr)
  data = arr.T if arr.ndim == 2 else arr.transpose(2, 1, 0)
  affine = np.diag([-float(spacing[1]), -float(spacing[0]), 1.0, 1.0])
  nib.save(nib.Nifti1Image(np.ascontiguousarray(data), affine), os.fspath(path))


def write_camus_view(out_dir: str | os.PathLike, seq: Sequence) -> Path:
  """Writes one sequence in the CAMUS 2023 layout under out_dir/<patient>/ (replacing it).

  Files: <patient>_<view>_half_sequence[_gt].nii.gz (all frames ED -> ES),
  <patient>_<view>_{ED,ES}[_gt].nii.gz and Info_<view>.cfg (ED: 1, ES: T,
  NbFrame: T). Images are uint8 (round(255 img)), masks uint8; the spacing is
  seq.attrs["voxelspacing"]. Written into a temporary folder, then renamed.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  final = out_dir / seq.patient
  tmp = Path(tempfile.mkdtemp(prefix=f".{seq.patient}.", dir=out_dir))
  try:
    sp = tuple(float(x) for x in np.asarray(seq.attrs["voxelspacing"]))
    img = np.clip(np.round(np.asarray(seq.img) * 255.0), 0, 255).astype(np.uint8)
    gt = np.asarray(seq.gt, np.uint8)
    stem = f"{seq.patient}_{seq.view}"
    write_nifti(tmp / f"{stem}_half_sequence.nii.gz", img, sp)
    write_nifti(tmp / f"{stem}_half_sequence_gt.nii.gz", gt, sp)
    for name, i in (("ED", 0), ("ES", -1)):
      write_nifti(tmp / f"{stem}_{name}.nii.gz", img[i], sp)
      write_nifti(tmp / f"{stem}_{name}_gt.nii.gz", gt[i], sp)
    t = seq.num_frames
    (tmp / f"Info_{seq.view}.cfg").write_text(f"ED: 1\nES: {t}\nNbFrame: {t}\n")
    if final.exists():
      shutil.rmtree(final)
    os.replace(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return final


REPORT_FIELDS = ("patient", "view", "frames", "dice_endo", "dice_epi", "dice_myo", "dice_la",
                 "ef_real_area", "ef_synth_area", "jdet_min", "fit_data_loss", "seconds")


def format_table(rows: list[dict[str, Any]]) -> str:
  """The per-sequence ES Dice report as a Markdown table with a mean row."""
  cols = REPORT_FIELDS[2:]
  head = "| patient | " + " | ".join(cols) + " |"
  lines = [head, "|" + "---|" * (len(cols) + 1)]
  fmt = lambda k, v: f"{v:d}" if k == "frames" else f"{v:.1f}" if k == "seconds" else f"{v:.3f}"
  for r in rows:
    lines.append(f"| {r['patient']} | " + " | ".join(fmt(k, r[k]) for k in cols) + " |")
  if rows:
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in cols}
    lines.append(f"| mean ({len(rows)}) | " + " | ".join(
        f"{mean[k]:.1f}" if k in ("frames", "seconds") else f"{mean[k]:.3f}" for k in cols) + " |")
  return "\n".join(lines)


def report_csv_path(out: str | os.PathLike) -> Path:
  """The CSV of the per-sequence report beside the HDF5 output: <out stem>_es_dice.csv."""
  out = Path(out)
  return out.with_name(out.name[:-len(out.suffix)] + "_es_dice.csv" if out.suffix
                       else out.name + "_es_dice.csv")


def make_dataset(camus_dir: str | os.PathLike, out: str | os.PathLike, size: int = 128,
                 seed: int = 0, num: int | None = None, patients: Seq[str] | None = None,
                 splits: str | os.PathLike | None = None, split: str = "valid",
                 nifti_out: str | os.PathLike | None = None, view: str = "4CH",
                 num_frames: int | None = None, map_cfg: MapConfig = MapConfig(),
                 noise_cfg: NoiseConfig = NoiseConfig(), store_flow: bool = True,
                 progress: bool = True) -> list[dict[str, Any]]:
  """Semi-synthetic sequences from the real ED/ES pairs of CAMUS patients.

  Reads each selected patient's `view` (camus.read_view), resamples it to
  size x size like the converter (convert.to_sequence), builds the sequence
  (semisynthetic_sequence, seeded by `seed` and the patient name) and writes
  the project's HDF5 layout at `out` (atomically, at the end) with
  `/<patient>/<view>/flow_true`; with `nifti_out`, also the CAMUS 2023 layout
  there (write_camus_view). The per-sequence report goes to
  report_csv_path(out) and, as a table with the mean, to the log.

  Returns the report rows (dicts with REPORT_FIELDS).
  """
  if size < 16:
    raise InputError(None, f"--size must be >= 16, got {size}")
  if os.path.isdir(out):
    raise InputError(out, "is a directory; --out must name an HDF5 file")
  folders = select_patients(camus_dir, patients, splits, split, num)
  rows: list[dict[str, Any]] = []
  prog = Progress(len(folders), "semisynthetic", "patient") if progress else None
  with atomic_path(out) as tmp:
    with h5py.File(tmp, "w") as f:
      set_root_attrs(f, size)
      for d in folders:
        cv = camus.read_view(d, view)
        if cv is None:
          raise InputError(d, f"no {view} view")
        if cv.gt is None or np.all(cv.gt[0] == UNANNOTATED) or np.all(cv.gt[-1] == UNANNOTATED):
          raise InputError(d, f"{view}: needs the ED and ES masks")
        src = to_sequence(cv, size)
        if src.num_frames > 2:   # a real sequence: keep its ED and ES frames only
          src = dataclasses.replace(src, img=src.img[[0, -1]], gt=src.gt[[0, -1]])
        seq, phi, rep = semisynthetic_sequence(src, seed, num_frames, map_cfg, noise_cfg)
        write_sequence(f, seq)
        if store_flow:
          write_dataset(f, seq.key, "flow_true", phi)
        if nifti_out is not None:
          write_camus_view(nifti_out, seq)
        rows.append(rep)
        if prog:
          prog.update(1, extra=f"{d.name} ES Dice endo {rep['dice_endo']:.3f} "
                      f"epi {rep['dice_epi']:.3f}")
  csv_path = report_csv_path(out)
  with atomic_path(csv_path) as tmp:
    with open(tmp, "w", newline="") as fh:
      w = csv.DictWriter(fh, fieldnames=REPORT_FIELDS)
      w.writeheader()
      for r in rows:
        w.writerow({k: r[k] for k in REPORT_FIELDS})
  logging.info("synthetic ES mask vs real ES mask (Dice), %s:\n%s", csv_path, format_table(rows))
  return rows
