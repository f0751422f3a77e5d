"""The configuration of a sequence fit (:class:`FitConfig`), saved as JSON with the results."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

from echo_ode_jax import flow
from echo_ode_jax.model import ModelConfig

# FitConfig fields of earlier versions about how the fit ran: ignored in saved configs.
REMOVED_FIELDS = frozenset({"scan_steps", "xla_cpu_ynn"})
PROPAGATIONS = ("forward", "bidirectional", "consensus")
ENSEMBLE_FUSIONS = ("velocity", "labels")
SIMILARITIES = ("forward", "symmetric")


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Everything that defines a fit (saved as JSON with the results).

  The paper gives Adam at lr 0.01 for 1000 steps but no loss weights. The
  defaults add what made fits stable (BENCHMARKS.md, "Fit stability"): the
  gradient norm clipped to 1, the lr decayed with a cosine to 0.001, R_Jdet
  weighted 100 and R_smt 0.03, and the parameters of the lowest loss returned.
  On real echocardiography a windowed NCC term followed the heart better than
  the paper's Gaussian MSE alone (BENCHMARKS.md, "Registration quality on real
  CAMUS"), so lambda_ncc is 1 by default. lambda_ncc=0, lr_decay="constant",
  clip_norm=None, keep_best=False, lambda_jdet=1 and lambda_smt=0 give plain
  Adam on the paper's terms.

  Units: sigma, ncc_sigma and ncc_window are pixels of the fitted grid; steps count Adam
  updates at the full grid (coarse_steps at each coarser pyramid level).
  """
  steps: int = 1000
  lr: float = 0.01
  lr_decay: str = "cosine"      # "cosine": decay from lr to lr * lr_final; "constant"
  lr_final: float = 0.1
  warmup_steps: int = 0         # > 0: the lr rises linearly from 0 over the first warmup_steps
                                # Adam steps of every stage (fit.lr_schedule); 0: none
  clip_norm: float | None = 1.0  # clip the global gradient norm before Adam (None: off)
  keep_best: bool = True        # return the parameters with the lowest loss seen
  solver: str = "euler"
  dt: float = 0.1
  sigma: float = 1.0            # Gaussian kernel of L_sim, pixels (at the fitted size)
  lambda_sim: float = 1.0
  lambda_ncc: float = 1.0       # local NCC similarity (losses.local_ncc; not in the paper)
  ncc_window: int = 9           # its window side, pixels (at the fitted size)
  ncc_sigma: float = 0.0        # L_ncc compares both images smoothed by a Gaussian of this
                                # many pixels (0: the raw images; losses.terms_from_phi)
  similarity: str = "forward"   # L_sim and L_ncc compare: "forward", I_0 o phi_t with I_t on
                                # frame t's grid (the paper's); "symmetric", the mean of that
                                # and I_t o phi_t^-1 with I_0 on I_0's grid (losses.terms_from_phi)
  velocity_sigma: float = 0.0   # Gaussian smoothing of V, pixels (0: none; losses.velocity)
  velocity_stride: int = 1      # the network runs at 1/stride of the grid (losses.velocity)
  pyramid_levels: int = 1       # coarse-to-fine: fit at 1/2^(L-1), ..., 1/2, then the full grid,
                                # adding one network per level (fit.pyramid)
  coarse_steps: int = 200       # Adam steps at each coarser level (`steps` at the full grid)
  affine_steps: int = 0         # > 0: first fit a global affine velocity alone for this many
                                # Adam steps (affine.py), then add the network(s); 0: none
  affine_factor: int = 4        # the affine stage fits on the grid reduced by this factor
  dense_steps: int = 0          # > 0: last, add a free-form velocity on a control grid (dense.py)
                                # and fit it, the network(s) held fixed, for this many Adam
                                # steps at the full grid; 0: none
  dense_factor: int = 4         # its control grid is the fit grid coarsened by this factor
  data_grid_masks: bool = True  # runner: m_0 warped on the data grid through the upsampled
                                # maps (propagate_labels); False: fit-grid masks, nearest-resized
  propagation: str = "forward"  # runner: "forward" m_0 o phi_t; "bidirectional" also carries
                                # the ES guide back and mixes them in time (fit.propagate_labels);
                                # "consensus" fuses the segmentation of every frame through the
                                # flow into one mask carried by it (fit.consensus_labels)
  lambda_seg: float = 1.0
  lambda_ef: float = 1.0
  lambda_jdet: float = 100.0
  jdet_margin: float = 0.0      # R_Jdet = mean(ReLU(jdet_margin - det D phi)^2), in [0, 1):
                                # 0 is the paper's (folds only); > 0 also area ratios below it
  lambda_smt: float = 0.03
  smt_order: int = 1            # R_smt on u = phi - id: 1, squared gradient (the paper's);
                                # 2, bending energy (zero for affine maps; losses.smoothness)
  t_bucket: int = 4             # frame counts are padded up to a multiple of this
  log_every: int = 50           # steps per progress line
  seed: int = 0
  ensemble: int = 1             # > 1: this many fits from different initialisations (member m
                                # from fold_in(key, m), member 0 from the key itself), phi the
                                # flow of their mean velocity (fit.py, "Ensembles")
  ensemble_fusion: str = "velocity"  # how an ensemble's members make its masks: "velocity",
                                # m_0 carried by the flow of their mean velocity; "labels", the
                                # mean of their soft m_0 o phi_k, then argmax (label fusion)
  model: ModelConfig = ModelConfig()

  def __post_init__(self):
    """Refuses settings no fit can run with: a one-line ValueError naming the field."""
    def bad(name, why):
      raise ValueError(f"FitConfig.{name} must be {why}, got {getattr(self, name)!r}")

    def number(v):
      return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
              and bool(np.isfinite(v)))

    for name in ("steps", "t_bucket", "log_every", "ncc_window", "velocity_stride",
                 "pyramid_levels", "coarse_steps", "affine_factor", "dense_factor", "ensemble"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        bad(name, "an integer >= 1")
    for name in ("affine_steps", "dense_steps", "warmup_steps"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
        bad(name, "an integer >= 0")
    for name in ("lr", "dt"):
      if not number(getattr(self, name)) or getattr(self, name) <= 0:
        bad(name, "a finite number > 0")
    for name in ("lr_final", "sigma", "ncc_sigma", "velocity_sigma", "lambda_sim", "lambda_ncc",
                 "lambda_seg", "lambda_ef", "lambda_jdet", "lambda_smt", "jdet_margin"):
      if not number(getattr(self, name)) or getattr(self, name) < 0:
        bad(name, "a finite number >= 0")
    if self.jdet_margin >= 1:
      bad("jdet_margin", "below 1 (a margin >= 1 penalises the identity)")
    if self.ncc_window < 3 or self.ncc_window % 2 == 0:
      bad("ncc_window", "an odd integer >= 3")
    if self.clip_norm is not None and (not number(self.clip_norm) or self.clip_norm <= 0):
      bad("clip_norm", "None or a finite number > 0")
    if self.smt_order not in (1, 2):
      bad("smt_order", "1 or 2")
    if self.propagation not in PROPAGATIONS:
      bad("propagation", f"one of {', '.join(PROPAGATIONS)}")
    if self.similarity not in SIMILARITIES:
      bad("similarity", f"one of {', '.join(SIMILARITIES)}")
    if self.ensemble_fusion not in ENSEMBLE_FUSIONS:
      bad("ensemble_fusion", f"one of {', '.join(ENSEMBLE_FUSIONS)}")
    if self.lr_decay not in ("constant", "cosine"):
      bad("lr_decay", "'constant' or 'cosine'")
    if self.solver not in flow.SOLVERS:
      bad("solver", f"one of {', '.join(flow.SOLVERS)}")

  def replace(self, **kw) -> "FitConfig":
    model_kw = {k[6:]: kw.pop(k) for k in list(kw) if k.startswith("model.")}
    cfg = dataclasses.replace(self, **kw)
    return dataclasses.replace(cfg, model=cfg.model.replace(**model_kw)) if model_kw else cfg

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict) -> "FitConfig":
    """A FitConfig from its JSON dict; fields of earlier versions that only chose
    how the fit was computed (REMOVED_FIELDS, model.REMOVED_FIELDS) are ignored."""
    d = {k: v for k, v in d.items() if k not in REMOVED_FIELDS}
    return cls(model=ModelConfig.from_dict(d.pop("model", {})), **d)
