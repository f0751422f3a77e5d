"""Demo jobs behind experiments/*.py (importable and tested).

  flow_demo       integrate a known analytic field, plot the deformation
  echo_ode_demo   the whole method on synthetic data: segmenter baseline vs Echo-ODE
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from echo_ode_jax import experiment, fit, flow, kernels, metrics, plots, runner, tables
from echo_ode_jax._atomic import atomic_h5, check_writes
from echo_ode_jax.data import hdf5, synthetic
from echo_ode_jax.errors import InputError
from echo_ode_jax.segmenters import predict, train


def analytic_spiral(size: int, contraction: float = 0.4, omega: float = 0.6):
  """A stationary linear field V(p) = A (p - c), A = [[-a, -w], [w, -a]].

  Returns (velocity (H, W, 2) in pixels/unit time, exact map fn t -> (H, W, 2),
  exact det fn t -> float). phi_t(p) = c + e^{-a t} R(w t) (p - c), det = e^{-2 a t}.
  """
  c = (size - 1) / 2.0
  g = np.asarray(kernels.identity_grid(size, size), np.float64) - c
  a, w = contraction, omega
  vel = np.stack([-a * g[..., 0] - w * g[..., 1], w * g[..., 0] - a * g[..., 1]], -1)

  def exact(t):
    s, th = np.exp(-a * t), w * t
    return c + s * np.stack([np.cos(th) * g[..., 0] - np.sin(th) * g[..., 1],
                             np.sin(th) * g[..., 0] + np.cos(th) * g[..., 1]], -1)

  return vel.astype(np.float32), exact, (lambda t: float(np.exp(-2 * a * t)))


def flow_demo(size: int = 128, solver: str = "euler", dt: float = 0.1,
              out: str = "flow_demo_out") -> dict:
  """Integrates :func:`analytic_spiral`, propagates a disc mask, writes a PNG."""
  vel, exact, det_exact = analytic_spiral(size)
  ts = flow.knot_times(solver, dt)
  knots = jnp.broadcast_to(jnp.asarray(vel), (len(ts),) + vel.shape)
  phi = np.asarray(jax.jit(lambda k: flow.integrate_flow(k, ts, [1.0], solver=solver,
                                                         dt=dt))(knots)[0])
  jdet = np.asarray(kernels.jacobian_determinant(jnp.asarray(phi)))
  c = (size - 1) / 2.0
  g = np.asarray(kernels.identity_grid(size, size))
  disc = ((g[..., 0] - c * 0.8) ** 2 + (g[..., 1] - c) ** 2 <= (0.25 * size) ** 2)
  m0 = disc.astype(np.int32)
  mt = np.asarray(kernels.hard_labels(kernels.warp_labels(m0, phi, num_classes=2)))
  err = np.linalg.norm(phi - exact(1.0), axis=-1)
  inner = np.hypot(g[..., 0] - c, g[..., 1] - c) < 0.4 * size
  os.makedirs(out, exist_ok=True)
  fig = plots.deformation_figure(phi, jdet, mask0=m0, mask_t=mt, title=(
      f"analytic spiral, {solver} dt={dt}: phi_1 error {err[inner].max():.3f} px"),
      grid_step=max(2, size // 24))
  path = plots.save(fig, os.path.join(out, "flow_demo.png"))
  return {
      "png": path,
      "max_error_px": round(float(err[inner].max()), 4),
      "det_exact": round(det_exact(1.0), 4),
      "det_mean": round(float(jdet[inner].mean()), 4),
      "folding_fraction": float(np.mean(jdet <= 0)),
      "mask_area_ratio": round(float(m0.sum() / max(1, mt.sum())), 4),
  }


# ---------------------------------------------------------------------------
# The Echo-ODE demo


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  """Settings of :func:`echo_ode_demo` (defaults: under 5 minutes on a 2-core CPU).

  num test sequences of num_frames frames at size^2 are fitted with `steps`
  Adam steps each at `lr`, the velocity network at 1/velocity_stride of the
  grid (FitConfig's defaults otherwise; the paper: steps=1000,
  velocity_stride=1), m_0 = the ED ground truth, guide = the 2D segmenter's
  ES and ED prediction (or the ground truth with guide="gt"); the segmenter (a
  small U-Net) is trained for seg_steps steps on the ED/ES frames of
  num_train other synthetic sequences (CAMUS-like: interior frames unannotated).
  batch_size: sequences per fit_batch call (None: all 8 in one batch).
  """
  num: int = 8
  size: int = 64
  num_frames: int = 12
  steps: int = 100
  velocity_stride: int = 2
  lr: float = 0.01
  seg_steps: int = 100
  num_train: int = 24
  seg_widths: tuple[int, ...] = (8, 16, 32, 64)
  guide: str = "segmenter"
  batch_size: int | None = None
  seed: int = 0

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


GROUND_TRUTH_NAME = "ground truth"
SEGMENTER_NAME = "U-Net (2D)"
ECHO_ODE_NAME = "Echo-ODE (U-Net guide)"


def _write_edes_train(path: str, num: int, size: int, num_frames: int, seed: int) -> None:
  """Synthetic training sequences annotated only at ED and ES (255 elsewhere),
  written atomically (:func:`echo_ode_jax._atomic.atomic_h5`)."""
  with atomic_h5(path) as f:
    hdf5.set_root_attrs(f, size)
    for i in range(num):
      seq, _ = synthetic.make_sequence(seed + i, size, num_frames,
                                       patient=f"train{seed + i:05d}")
      gt = seq.gt.copy()
      gt[1:-1] = hdf5.UNANNOTATED
      seq.gt = gt
      hdf5.write_sequence(f, seq)
      check_writes(f)      # a full disk stops here


def _demo_files(out: str) -> list[str]:
  return [os.path.join(out, n) for n in (
      "demo_config.json", "data.h5", "train_edes.h5", "segmenter", "unet_pred.h5",
      "echo_ode.h5", "echo_ode.h5.parts", "ground_truth.h5", "metrics.csv", "summary.json",
      "table.md", "fig2_contours.png", "fig3b_lv_length.png", "fig4_deformation.png")]


def echo_ode_demo(cfg: DemoConfig = DemoConfig(), out: str = "demo_out",
                  fresh: bool = False) -> dict:
  """Synthetic data -> 2D segmenter baseline and Echo-ODE fit -> Table I + figures.

  Stages (each leaves a file in `out`; a rerun with the same settings resumes):
  data.h5 (test sequences, every frame annotated), train_edes.h5, segmenter/
  (training workdir), unet_pred.h5 (the per-frame baseline), echo_ode.h5 (fit
  results with flows, via runner.fit_file), ground_truth.h5 (the true masks
  as a reference row), then metrics.csv, summary.json, table.md and the
  figures fig2_contours.png, fig3b_lv_length.png, fig4_deformation.png.

  Args:
    fresh: delete the demo's files in `out` first (otherwise a folder holding
      a demo with other settings is an error).

  Returns:
    {"table": markdown, "summaries", "seconds" (total), "timings" (per stage),
     "files", "config"}.
  """
  if cfg.guide not in ("segmenter", "gt"):
    raise ValueError(f"guide must be 'segmenter' or 'gt', got {cfg.guide!r}")
  t_start = time.perf_counter()
  timings: dict[str, float] = {}
  if fresh:
    for p in _demo_files(out):
      if os.path.isdir(p):
        shutil.rmtree(p)
      elif os.path.exists(p):
        os.remove(p)
  os.makedirs(out, exist_ok=True)
  cfg_path = os.path.join(out, "demo_config.json")
  if os.path.exists(cfg_path):
    old = experiment.read_json(cfg_path)
    if old != json.loads(cfg.to_json()):
      raise InputError(cfg_path, "the folder holds a demo run with other settings; "
                       "use --fresh or another --out")
  else:
    experiment.write_json(cfg_path, json.loads(cfg.to_json()))

  def timed(name, fn):
    t0 = time.perf_counter()
    r = fn()
    timings[name] = round(time.perf_counter() - t0, 1)
    return r

  data = os.path.join(out, "data.h5")
  train_h5 = os.path.join(out, "train_edes.h5")
  timed("data", lambda: (
      experiment.stage(data, lambda: synthetic.make_dataset(
          data, cfg.num, cfg.size, cfg.seed, num_frames=cfg.num_frames, progress=False),
          "synthetic test sequences"),
      experiment.stage(train_h5, lambda: _write_edes_train(
          train_h5, cfg.num_train, cfg.size, cfg.num_frames, cfg.seed + 100_000),
          "synthetic ED/ES training frames")))

  # 2D segmenter: epochs chosen so that about seg_steps steps are taken.
  workdir = os.path.join(out, "segmenter")
  tcfg = train.TrainConfig(model="unet", model_kwargs={"widths": list(cfg.seg_widths)},
                           size=cfg.size, batch_size=8, lr=3e-3, patience=10 ** 6,
                           seed=cfg.seed)
  tr_keys, _ = train.split_keys(train_h5, None, tcfg.valid_fraction, tcfg.seed)
  per_epoch = max(1, 2 * len(tr_keys) // tcfg.batch_size)
  tcfg = dataclasses.replace(tcfg, epochs=max(1, math.ceil(cfg.seg_steps / per_epoch)))
  timed("segmenter_train", lambda: train.train(tcfg, train_h5, workdir))
  pred = os.path.join(out, "unet_pred.h5")
  timed("segmenter_predict", lambda: experiment.stage(pred, lambda: predict.write_predictions(
      train.load_model_state(workdir, "best"), data, pred), "segmenter predictions"))

  # Echo-ODE: m_0 = ED ground truth, guided by the segmenter's ES/ED prediction.
  fcfg = fit.FitConfig(steps=cfg.steps, lr=cfg.lr, velocity_stride=cfg.velocity_stride,
                       log_every=max(1, cfg.steps // 4), seed=cfg.seed)
  bs = cfg.batch_size or 8   # one batch (fit_batch picks its batch mode per backend)
  fit_h5 = os.path.join(out, "echo_ode.h5")
  timed("echo_ode_fit", lambda: runner.fit_file(
      data, fit_h5, fcfg, init="gt", guide=cfg.guide,
      segmentation=pred if cfg.guide == "segmenter" else None, batch_size=bs,
      save_flow=True))

  def evaluate():
    # The ground truth scored like a method: the consecutive-frame HD and
    # temporal errors that the true motion itself has at this size.
    truth = tables.label_file(data, os.path.join(out, "ground_truth.h5"))
    results = {GROUND_TRUTH_NAME: metrics.evaluate_files(data, truth),
               SEGMENTER_NAME: metrics.evaluate_files(data, pred),
               ECHO_ODE_NAME: metrics.evaluate_files(data, fit_h5)}
    extra = {GROUND_TRUTH_NAME: {"pred": "ground_truth.h5"},
             SEGMENTER_NAME: {"pred": "unet_pred.h5", "train": json.loads(tcfg.to_json())},
             ECHO_ODE_NAME: {"pred": "echo_ode.h5", "init": "gt", "guide": cfg.guide,
                             "config": json.loads(fcfg.to_json())}}
    return experiment.write_report(out, results, extra)

  summaries = timed("evaluate", evaluate)
  figs = timed("figures", lambda: experiment.write_figures(
      data, {SEGMENTER_NAME: pred, ECHO_ODE_NAME: fit_h5}, out))
  with open(os.path.join(out, "table.md")) as f:
    table = f.read()
  return {"table": table, "summaries": summaries, "timings": timings,
          "seconds": round(time.perf_counter() - t_start, 1), "figures": figs,
          "files": sorted(os.listdir(out)), "config": json.loads(cfg.to_json())}
