"""Synthetic apical-4-chamber-like sequences with a known diffeomorphic motion.

The built-in data for the demo and the tests: no download, deterministic given a
seed, fast (a 128^2, 20-frame sequence takes well under a second).

Geometry (ED, normalised coordinates: 1 unit = the image side, FOV_MM mm):
  * a sector (fan) field of view with its apex at the top centre;
  * the LV cavity (label 1): an ellipse truncated at the mitral (base) line,
    apex at the top; the myocardium (label 2): a thicker truncated ellipse
    around it; the LA (label 3): an ellipse below the base line. A dark RV and
    RA (label 0) sit beside them. Sizes, position and tilt are randomised.

Motion: a smooth, stationary velocity field v (normalised units per unit
"motion time" tau) in heart coordinates (u along the long axis, from the apex
towards the base; w across): longitudinal shortening (the base moves towards
the fixed apex, v_u = -l u inside the LV, fading below the base) plus radial
contraction (v_w = -r w / (1 + (w/B)^4), strongest at the endocardium, weaker
at the epicardium, so the myocardium thickens), faded out away from the heart.
Frame k (time s_k = k / (T-1)) is reached at tau_k = (1 - cos(pi s_k^g)) / 2,
a non-linear (fast early ejection) profile. The true pull-back map is the flow
of -v for tau_k, integrated per pixel with RK4 on the *analytic* field:

  phi_k(p) = Phi_{-tau_k}(p),     gt_k(p) = label_ED(phi_k(p))

so phi_0 = identity, every phi_k is a diffeomorphism, and the labels of frame
k are the analytic ED shapes rasterised at phi_k(p) (no resampling of a mask).
The radial amplitude r is solved (Brent's method) so that the LV cavity *area*
ejection fraction EF = 1 - A_ES / A_ED (the paper's area proxy of the volume)
equals the requested `ef`; A_ES is the area of the ED cavity boundary
polygon pushed forward by Phi_{+1} (shoelace formula).

Image: echogenicity (blood dark, myocardium bright, tissue in between) times
Rayleigh speckle |z_k|, with z_k = rho Z(phi_k(p)) + sqrt(1 - rho^2) F_k(p): Z
is a complex texture that moves with the tissue (something to track), F_k
fresh noise that decorrelates between frames. Log-compressed to [0, 1] and
masked by the sector.

Conventions: pixel centres at integer (row, col); phi in absolute pixel
positions, (T, H, W, 2); a normalised coordinate x maps to pixel x * S - 0.5.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
from jaxtyping import Float
from scipy import ndimage, optimize

from echo_ode_jax._atomic import atomic_h5, check_writes
from echo_ode_jax._progress import Progress
from echo_ode_jax.data.hdf5 import Sequence, set_root_attrs, write_dataset, write_sequence
from echo_ode_jax.data.resample import Resampling

FOV_MM = 150.0          # physical side of the (square) image, mm
DEFAULT_FRAMES = (12, 20)   # inclusive range of the random number of frames
DEFAULT_EF = (0.35, 0.70)   # range of the random area ejection fraction
_STEPS_PER_TAU = 16     # RK4 steps per unit motion time

# Tissue classes of the generator; CLASS_TO_LABEL maps them to the labels.
_TISSUE, _LV, _MYO, _LA, _RV, _RA = range(6)
CLASS_TO_LABEL = np.array([0, 1, 2, 3, 0, 0], np.uint8)
_ECHO = np.array([0.35, 0.05, 0.75, 0.05, 0.06, 0.06])  # echogenicity per class


@dataclasses.dataclass(frozen=True)
class Heart:
  """ED geometry and motion parameters, normalised units (1 = image side)."""
  apex: tuple[float, float]   # epicardial apex (row, col)
  angle: float                # long-axis tilt from the vertical, radians
  a_lv: float                 # cavity ellipse semi-axis along the long axis
  b_lv: float                 # cavity ellipse semi-axis across
  t_apex: float               # apical wall thickness
  t_wall: float               # lateral wall thickness
  a_la: float                 # LA semi-axes
  b_la: float
  long_rate: float            # l: longitudinal velocity gradient (per tau)
  radial_rate: float = 0.0    # r: radial contraction rate (per tau), solved for EF
  gamma: float = 0.8          # exponent of the time profile

  @property
  def axis(self) -> np.ndarray:
    return np.array([np.cos(self.angle), np.sin(self.angle)])

  @property
  def normal(self) -> np.ndarray:
    return np.array([-np.sin(self.angle), np.cos(self.angle)])

  @property
  def centre_u(self) -> float:
    """u of the centre of the cavity / epicardium ellipses."""
    return self.t_apex + self.a_lv

  @property
  def base_u(self) -> float:
    """u of the base (mitral) line: the cavity is truncated at 0.7 a_lv below its centre."""
    return self.centre_u + 0.7 * self.a_lv

  def to_heart(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 2) normalised (row, col) -> heart coordinates (u, w)."""
    d0 = x[..., 0] - self.apex[0]
    d1 = x[..., 1] - self.apex[1]
    a, n = self.axis, self.normal
    return d0 * a[0] + d1 * a[1], d0 * n[0] + d1 * n[1]

  def from_heart(self, u: np.ndarray, w: np.ndarray) -> np.ndarray:
    a, n = self.axis, self.normal
    return np.stack([self.apex[0] + u * a[0] + w * n[0],
                     self.apex[1] + u * a[1] + w * n[1]], axis=-1)


def random_heart(rng: np.random.Generator) -> Heart:
  return Heart(
      apex=(rng.uniform(0.08, 0.12), rng.uniform(0.50, 0.57)),
      angle=np.deg2rad(rng.uniform(-8.0, 8.0)),
      a_lv=rng.uniform(0.24, 0.28),
      b_lv=rng.uniform(0.12, 0.15),
      t_apex=rng.uniform(0.045, 0.06),
      t_wall=rng.uniform(0.055, 0.07),
      a_la=rng.uniform(0.13, 0.16),
      b_la=rng.uniform(0.10, 0.12),
      long_rate=rng.uniform(0.12, 0.22),
      gamma=rng.uniform(0.7, 0.9),
  )


def tissue_classes(heart: Heart, x: np.ndarray) -> np.ndarray:
  """Tissue class (0 tissue, 1 LV, 2 myo, 3 LA, 4 RV, 5 RA) at normalised ED points x (..., 2)."""
  h = heart
  u, w = h.to_heart(x)
  du = u - h.centre_u
  above = u <= h.base_u
  cav = above & ((du / h.a_lv) ** 2 + (w / h.b_lv) ** 2 < 1.0)
  epi = above & ((du / (h.a_lv + h.t_apex)) ** 2 + (w / (h.b_lv + h.t_wall)) ** 2 < 1.0)
  la_c = h.base_u + 0.75 * h.a_la
  la = ~above & (((u - la_c) / h.a_la) ** 2 + (w / h.b_la) ** 2 < 1.0)
  # RV beside the septum (negative w = image left for a vertical axis), RA below it.
  w_rv = -(h.b_lv + h.t_wall + 0.015 + 0.08)
  rv = ((u - (h.centre_u + 0.05)) / (0.8 * h.a_lv + 0.03)) ** 2 + ((w - w_rv) / 0.08) ** 2 < 1.0
  rv &= u <= h.base_u + 0.01
  ra = ((u - (h.base_u + 0.13)) / 0.11) ** 2 + ((w - (w_rv - 0.01)) / 0.085) ** 2 < 1.0
  ra &= u > h.base_u + 0.03
  out = np.full(u.shape, _TISSUE, np.uint8)
  out[rv] = _RV
  out[ra] = _RA
  out[la] = _LA
  out[epi] = _MYO
  out[cav] = _LV
  return out


def velocity(heart: Heart, x: np.ndarray, radial_rate: float | None = None) -> np.ndarray:
  """Stationary velocity field (..., 2), normalised units per unit tau, at points x (..., 2)."""
  h = heart
  r = h.radial_rate if radial_rate is None else radial_rate
  u, w = h.to_heart(x)
  lat = np.exp(-0.5 * (w / 0.28) ** 2)                       # fades away from the heart
  below = np.maximum(u - h.base_u, 0.0)
  fade_u = np.exp(-0.5 * (below / 0.2) ** 2) * np.exp(-0.5 * (np.minimum(u, 0.0) / 0.05) ** 2)
  v_u = -h.long_rate * u * fade_u * lat
  inside = 1.0 / (1.0 + np.exp((u - h.base_u - 0.03) / 0.03))  # radial motion stops below the base
  inside *= 1.0 / (1.0 + np.exp(-(u + 0.02) / 0.03))           # ... and above the apex
  v_w = -r * w / (1.0 + (w / h.b_lv) ** 4) * inside
  a, n = h.axis, h.normal
  return np.stack([v_u * a[0] + v_w * n[0], v_u * a[1] + v_w * n[1]], axis=-1)


def _rk4_flow(heart: Heart, x: np.ndarray, taus: np.ndarray, sign: float,
              radial_rate: float | None = None) -> np.ndarray:
  """Positions (len(taus), ..., 2) of the flow of sign * v from x, at increasing taus >= 0."""
  out = np.empty((len(taus),) + x.shape)
  cur = np.array(x, np.float64)
  t_cur = 0.0
  f = lambda y: sign * velocity(heart, y, radial_rate)
  for i, tau in enumerate(taus):
    span = tau - t_cur
    n = max(1, int(np.ceil(span * _STEPS_PER_TAU - 1e-9))) if span > 0 else 0
    for _ in range(n):
      dt = span / n
      k1 = f(cur)
      k2 = f(cur + 0.5 * dt * k1)
      k3 = f(cur + 0.5 * dt * k2)
      k4 = f(cur + dt * k3)
      cur = cur + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    t_cur = tau
    out[i] = cur
  return out


def cavity_polygon(heart: Heart, n: int = 600) -> np.ndarray:
  """(N, 2) normalised ED LV-cavity boundary (the truncated ellipse), counter-clockwise in (u, w)."""
  h = heart
  c = (h.base_u - h.centre_u) / h.a_lv          # = 0.7: cos of the truncation angle
  th0 = np.arccos(c)
  th = np.linspace(th0, 2 * np.pi - th0, n)      # arc through the apex (theta = pi)
  u = h.centre_u + h.a_lv * np.cos(th)
  w = h.b_lv * np.sin(th)
  return h.from_heart(u, w)                      # the closing edge is the base line


def _shoelace(p: np.ndarray) -> float:
  return 0.5 * abs(np.sum(p[:, 0] * np.roll(p[:, 1], -1) - np.roll(p[:, 0], -1) * p[:, 1]))


def area_ef(heart: Heart, radial_rate: float | None = None) -> float:
  """Continuous area EF = 1 - A_ES / A_ED of the LV cavity (polygon pushed by the flow)."""
  poly = cavity_polygon(heart)
  es = _rk4_flow(heart, poly, np.array([1.0]), +1.0, radial_rate)[0]
  return 1.0 - _shoelace(es) / _shoelace(poly)


def solve_radial_rate(heart: Heart, ef: float, tol: float = 1e-5) -> float:
  """The radial contraction rate r >= 0 that gives the area EF `ef` (Brent's method)."""
  f = lambda r: area_ef(heart, r) - ef
  lo, hi = 0.0, 1.0
  if f(lo) > 0:
    raise ValueError(f"ef={ef:.3f} is below the longitudinal-only EF {area_ef(heart, lo):.3f}")
  while f(hi) < 0:
    lo, hi = hi, 2.0 * hi
    if hi > 64:
      raise ValueError(f"ef={ef:.3f} is not reachable")
  return float(optimize.brentq(f, lo, hi, xtol=tol))


def time_profile(s: np.ndarray, gamma: float) -> np.ndarray:
  """Motion time tau(s) in [0, 1] at normalised frame times s in [0, 1]; monotone, non-linear."""
  return 0.5 * (1.0 - np.cos(np.pi * np.asarray(s, np.float64) ** gamma))


def _complex_field(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
  """Smoothed circular complex Gaussian field with E|z|^2 = 1."""
  z = ndimage.gaussian_filter(rng.standard_normal((2,) + tuple(shape)), (0, sigma, sigma))
  z = z[0] + 1j * z[1]
  return z / np.sqrt(np.mean(np.abs(z) ** 2))


def sector_mask(size: int, soft: float = 1.0) -> np.ndarray:
  """(S, S) float in [0, 1]: the fan-shaped field of view (apex at the top centre)."""
  pix = (np.arange(size) + 0.5) / size
  r, c = np.meshgrid(pix, pix, indexing="ij")
  dr, dc = r + 0.02, c - 0.5
  rad = np.hypot(dr, dc)
  ang = np.abs(np.arctan2(dc, dr))
  edge = soft / size
  m = np.clip((np.deg2rad(40.0) - ang) * rad / edge + 0.5, 0, 1)
  return m * np.clip((0.98 - rad) / edge + 0.5, 0, 1) * np.clip((rad - 0.04) / edge, 0, 1)


def make_sequence(seed: int, size: int = 128, num_frames: int | None = None,
                  ef: float | None = None, patient: str | None = None,
                  rho: float = 0.8
                  ) -> tuple[Sequence, Float[np.ndarray, "T H W 2"]]:
  """One synthetic A4C-like sequence, ED -> ES.

  Args:
    seed: random seed (the result is a deterministic function of the arguments).
    size: image side S in pixels (>= 16).
    num_frames: T >= 2; default random in DEFAULT_FRAMES.
    ef: LV area ejection fraction 1 - A_ES / A_ED in (0, 1); default random in DEFAULT_EF.
    patient: the patient name (default "synth<seed:04d>").
    rho: correlation of the speckle with the moving tissue texture (0: pure
      frame noise, 1: frozen speckle).

  Returns:
    (seq, phi_true): seq.img (T, S, S) float32 in [0, 1], seq.gt (T, S, S) uint8,
    seq.attrs with voxelspacing (mm/px), ed_index=0, es_index=T-1, ef_true, ...;
    phi_true (T, S, S, 2) float32 absolute pull-back maps in pixels:
    gt[t](p) = gt[0](phi_true[t, p]), phi_true[0] = identity.
  """
  if size < 16:
    raise ValueError(f"size must be >= 16, got {size}")
  rng = np.random.default_rng(seed)
  heart = random_heart(rng)
  t_frames = int(rng.integers(DEFAULT_FRAMES[0], DEFAULT_FRAMES[1] + 1)) \
      if num_frames is None else int(num_frames)
  if t_frames < 2:
    raise ValueError(f"num_frames must be >= 2, got {num_frames}")
  ef_req = float(rng.uniform(*DEFAULT_EF)) if ef is None else float(ef)
  if not 0.0 < ef_req < 1.0:
    raise ValueError(f"ef must be in (0, 1), got {ef}")
  heart = dataclasses.replace(heart, radial_rate=solve_radial_rate(heart, ef_req))

  s = np.arange(t_frames) / (t_frames - 1)
  taus = time_profile(s, heart.gamma)
  pix = (np.arange(size) + 0.5) / size
  grid = np.stack(np.meshgrid(pix, pix, indexing="ij"), axis=-1)          # (S, S, 2)
  phi_n = np.concatenate([grid[None], _rk4_flow(heart, grid, taus[1:], -1.0)], axis=0)
  phi = (phi_n * size - 0.5)                                              # pixels

  classes = tissue_classes(heart, phi_n)                                   # (T, S, S)
  gt = CLASS_TO_LABEL[classes]

  # Image formation.
  px = size / 128.0                                   # pixels per "128-pixel" pixel
  echo = _ECHO[classes]
  echo = ndimage.gaussian_filter(echo, (0, 0.8 * px, 0.8 * px))
  bg = 1.0 + 0.25 * ndimage.gaussian_filter(rng.standard_normal((size, size)), 6 * px)
  depth = np.hypot(grid[..., 0] + 0.02, grid[..., 1] - 0.5)
  gain = bg * np.exp(-0.6 * depth)
  pad = 4
  tex = _complex_field(rng, (size + 2 * pad, size + 2 * pad), 0.7 * px)   # moves with tissue
  coords = phi.transpose(0, 3, 1, 2) + pad                                # (T, 2, S, S)
  moving = np.stack([ndimage.map_coordinates(tex.real, c, order=1, mode="nearest")
                     + 1j * ndimage.map_coordinates(tex.imag, c, order=1, mode="nearest")
                     for c in coords])
  fresh = np.stack([_complex_field(rng, (size, size), 0.7 * px) for _ in range(t_frames)])
  z = rho * moving + np.sqrt(1.0 - rho ** 2) * fresh
  amp = echo * gain[None] * np.abs(z)
  db = 20.0 * np.log10(amp + 1e-4)
  img = np.clip((db + 30.0) / 36.0, 0.0, 1.0) * sector_mask(size)[None]

  spacing = FOV_MM / size
  name = f"synth{seed:04d}" if patient is None else patient
  attrs: dict[str, Any] = {
      "voxelspacing": np.array([spacing, spacing]),
      "source_voxelspacing": np.array([spacing, spacing]),
      "source_shape": np.array([size, size]),
      "ed_index": 0, "es_index": t_frames - 1,
      "ed": 1, "es": t_frames, "nbframe": t_frames,
      "ef_true": ef_req,
      "seed": int(seed),
      "synthetic": 1,
  }
  attrs.update(identity_resample_attrs(size))
  seq = Sequence(name, "4CH", img.astype(np.float32), gt.astype(np.uint8), attrs)
  return seq, phi.astype(np.float32)


def identity_resample_attrs(size: int) -> dict[str, np.ndarray]:
  """Resampling attrs (see resample.py) of data already stored at its source grid."""
  return Resampling.identity((size, size)).attrs()


def make_dataset(path: str | os.PathLike, num: int, size: int = 128, seed: int = 0,
                 num_frames: int | None = None, ef: float | None = None,
                 store_flow: bool = True, progress: bool = True) -> list[str]:
  """Writes `num` synthetic sequences (patients synth<seed+i>, view 4CH) to an HDF5 file.

  The file follows the project layout (hdf5.py), plus `/<patient>/4CH/flow_true`
  (T, S, S, 2) float32, the true absolute pull-back maps (with `store_flow`).
  Written atomically (:func:`echo_ode_jax._atomic.atomic_h5`: on any error
  `path` is left as it was and no temporary file remains). Returns the keys.
  """
  keys = []
  prog = Progress(num, "synthetic", "sequence") if progress else None
  with atomic_h5(path) as f:
    set_root_attrs(f, size)
    for i in range(num):
      seq, phi = make_sequence(seed + i, size, num_frames, ef)
      write_sequence(f, seq)
      if store_flow:
        write_dataset(f, seq.key, "flow_true", phi)
      check_writes(f)      # a full disk stops here
      keys.append(seq.key)
      if prog:
        prog.update(1)
  return keys
