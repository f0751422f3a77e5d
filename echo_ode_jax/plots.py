"""Figures (matplotlib, Agg backend): deformation grids, contours, attribute curves.

  contour_figure       Fig. 2 style: rows = methods (incl. ground truth), columns = frames
  curve_figure         Fig. 3b style: one attribute (e.g. LV length) over time per method
  lv_length_mm         the LV length curve (apex to mitral-valve midpoint, mm)
  registration_figure  Fig. 4 style, per frame: target I_t, I_0 o phi_t, grid, det D phi_t
  deformation_figure   one deformation: grid, warped image/mask, Jacobian-determinant map
  write_figures        Fig. 2 / 3b / 4 PNGs of one sequence from data and prediction files
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import h5py
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from echo_ode_jax._atomic import atomic_path  # noqa: E402
from echo_ode_jax.data import hdf5  # noqa: E402
from echo_ode_jax.errors import InputError  # noqa: E402
from echo_ode_jax.metrics import jacobian_determinant_np, lv_apex, lv_base_points  # noqa: E402

LABEL_COLOURS = {1: "#f2c12e", 2: "#2ec4b6", 3: "#e71d36"}  # LV, myocardium, LA


def draw_grid(ax, phi: np.ndarray, step: int = 4, **kw) -> None:
  """Draws the deformed grid lines of an (H, W, 2) absolute (row, col) map."""
  kw = {"color": "k", "lw": 0.5, **kw}
  h, w = phi.shape[:2]
  for r in list(range(0, h, step)) + [h - 1]:
    ax.plot(phi[r, :, 1], phi[r, :, 0], **kw)
  for c in list(range(0, w, step)) + [w - 1]:
    ax.plot(phi[:, c, 1], phi[:, c, 0], **kw)
  ax.set_xlim(-0.5, w - 0.5)
  ax.set_ylim(h - 0.5, -0.5)
  ax.set_aspect("equal")


def draw_contours(ax, labels: np.ndarray, colours=None, lw: float = 1.0, ls="-") -> None:
  """Draws the outline of each label of an (H, W) label map."""
  colours = colours or LABEL_COLOURS
  for lab, col in colours.items():
    m = (labels == lab).astype(float)
    if m.any():
      ax.contour(m, levels=[0.5], colors=[col], linewidths=lw, linestyles=ls)


#: Outlines drawn by `draw_structures`: name -> (labels forming it, colour), as in
#: the paper's Fig. 2 (endocardium yellow, epicardium teal) plus the LA.
STRUCTURE_OUTLINES = {
    "endo (LV cavity)": ((1,), "#f2c12e"),
    "epi (LV + myocardium)": ((1, 2), "#2ec4b6"),
    "LA": ((3,), "#e71d36"),
}


def draw_structures(ax, labels: np.ndarray, lw: float = 1.0, outlines=None) -> None:
  """Outlines the endocardium, the epicardium and the LA of an (H, W) label map."""
  for members, col in (outlines or STRUCTURE_OUTLINES).values():
    m = np.isin(labels, members).astype(float)
    if m.any():
      ax.contour(m, levels=[0.5], colors=[col], linewidths=lw)


def structures_legend(fig, outlines=None, **kw) -> None:
  outlines = outlines or STRUCTURE_OUTLINES
  handles = [plt.Line2D([], [], color=c, lw=2) for _, c in outlines.values()]
  fig.legend(handles, list(outlines), **{"loc": "lower center", "ncol": len(outlines),
                                         "fontsize": 8, "frameon": False, **kw})


def save(fig, path: str | os.PathLike, dpi: int = 120) -> str:
  """Saves a figure atomically as PNG and closes it."""
  path = os.fspath(path)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
  plt.close(fig)
  return path


def deformation_figure(phi: np.ndarray, jdet: np.ndarray, image: np.ndarray | None = None,
                       warped: np.ndarray | None = None, mask0: np.ndarray | None = None,
                       mask_t: np.ndarray | None = None, title: str = "", grid_step: int = 4):
  """Fig. 4 style: deformed grid, warped image/mask, Jacobian-determinant map.

  Args:
    phi: (H, W, 2) absolute map at time t. jdet: (H, W) det(D phi).
    image / warped: optional (H, W) I_0 and I_0 o phi_t.
    mask0 / mask_t: optional (H, W) labels at time 0 and propagated to t.
  """
  mask_panel = mask_t is not None and warped is None
  panels = 2 + (image is not None) + (warped is not None) + mask_panel
  fig, axes = plt.subplots(1, panels, figsize=(3.6 * panels, 3.6))
  i = 0
  if image is not None:
    axes[i].imshow(image, cmap="jet" if warped is not None else "gray")
    if mask0 is not None:
      draw_contours(axes[i], mask0)
    axes[i].set_title("I_0" + (" + m_0" if mask0 is not None else ""))
    i += 1
  if warped is not None:
    axes[i].imshow(warped, cmap="jet")
    if mask_t is not None:
      draw_contours(axes[i], mask_t)
    axes[i].set_title("I_0 o phi_t" + (" + m_t" if mask_t is not None else ""))
    i += 1
  if mask_panel:
    axes[i].imshow(mask_t, cmap="Greys", vmin=0, vmax=max(1, int(mask_t.max())) * 2)
    if mask0 is not None:
      draw_contours(axes[i], mask0, colours={1: "tab:red"})
    axes[i].set_title("m_t = m_0 o phi_t" + (" (red: m_0)" if mask0 is not None else ""))
    i += 1
  ax = axes[i]
  draw_grid(ax, phi, step=grid_step, color="tab:blue")
  ax.set_title("deformed grid phi_t")
  i += 1
  lim = max(abs(float(np.min(jdet)) - 1), abs(float(np.max(jdet)) - 1), 1e-3)
  im = axes[i].imshow(jdet, cmap="RdBu_r", vmin=1 - lim, vmax=1 + lim)
  fold = float(np.mean(jdet <= 0))
  axes[i].set_title(f"det D phi_t (min {np.min(jdet):.2f}, folding {100 * fold:.2f}%)",
                    fontsize=9)
  fig.colorbar(im, ax=axes[i], fraction=0.046)
  for a in axes:
    a.set_xticks([])
    a.set_yticks([])
  if title:
    fig.suptitle(title)
  return fig


def _gt_like(name: str) -> bool:
  return name.lower() in ("gt", "ground truth", "ground-truth")


def contour_figure(images: np.ndarray, labels: dict[str, np.ndarray], frames, title: str = "",
                   panel: float = 2.2):
  """Fig. 2 style: predicted contours over the frames, one row per method.

  Args:
    images: (T, H, W) frames.
    labels: method name -> (T, H, W) label maps (ground truth included; frames
      that are all 255 are shown as not annotated).
    frames: frame indices (columns).
  """
  frames = list(frames)
  rows = max(1, len(labels))
  fig, axes = plt.subplots(rows, len(frames), figsize=(panel * len(frames), panel * rows),
                           squeeze=False)
  names = list(labels) or [""]
  for i, name in enumerate(names):
    for j, t in enumerate(frames):
      ax = axes[i, j]
      ax.imshow(images[t], cmap="gray", vmin=0, vmax=1)
      lab = labels.get(name)
      if lab is not None:
        if np.all(lab[t] == 255):
          ax.text(0.5, 0.5, "not annotated", color="w", ha="center", va="center",
                  transform=ax.transAxes, fontsize=8)
        else:
          draw_structures(ax, np.where(lab[t] == 255, 0, lab[t]), lw=1.0)
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(f"frame {t}", fontsize=9)
      if j == 0:
        ax.set_ylabel(name, fontsize=9)
  structures_legend(fig)
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout(rect=(0, 0.04, 1, 0.97 if title else 1))
  return fig


def lv_length_mm(labels: np.ndarray, spacing=(1.0, 1.0)) -> np.ndarray:
  """(T,) distance in mm from the mitral-valve midpoint to the LV apex (paper Fig. 3b).

  Base points and apex as in the temporal-consistency attributes
  (`metrics.lv_base_points`, `metrics.lv_apex`), measured on the stored grid
  with `spacing` (row, col) mm per pixel. nan where the LV or its base is not
  found (and on unannotated frames, all 255).
  """
  sp = np.asarray(spacing, np.float64)
  out = []
  for seg in np.asarray(labels):
    base = None if np.all(seg == 255) else lv_base_points(seg)
    if base is None:
      out.append(np.nan)
      continue
    mid = base.mean(axis=0)
    apex = lv_apex(seg, mid, sp)
    out.append(np.nan if apex is None else float(np.hypot(*((apex - mid) * sp))))
  return np.asarray(out, np.float64)


def curve_figure(curves: dict[str, np.ndarray], ylabel: str, title: str = "",
                 xlabel: str = "frame (ED -> ES)"):
  """Fig. 3b style: one curve per method; the ground truth black and dashed."""
  fig, ax = plt.subplots(figsize=(5.5, 3.4))
  for name, y in curves.items():
    y = np.asarray(y, np.float64)
    x = np.arange(len(y))
    if _gt_like(name):
      ax.plot(x, y, "k--o", ms=3, lw=1.5, label=name, zorder=3)
    else:
      ax.plot(x, y, "-o", ms=3, lw=1.2, label=name)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  if title:
    ax.set_title(title, fontsize=10)
  fig.tight_layout()
  return fig


def _warp_np(image: np.ndarray, phi: np.ndarray) -> np.ndarray:
  """I o phi: bilinear sampling of (H, W) at absolute (row, col) positions, border clamp."""
  return ndimage.map_coordinates(np.asarray(image, np.float64),
                                 np.moveaxis(np.asarray(phi, np.float64), -1, 0),
                                 order=1, mode="nearest")


_ON_JET = {"endo": ((1,), "w"), "epi": ((1, 2), "k"), "LA": ((3,), "m")}


def registration_figure(images: np.ndarray, phi: np.ndarray, frames=None,
                        masks: np.ndarray | None = None, title: str = "",
                        grid_step: int | None = None, panel: float = 2.6):
  """Fig. 4 style: one row per frame t: I_t, I_0 o phi_t (jet), deformed grid, det D phi_t.

  Args:
    images: (T, H, W) frames; phi: (T, h, w, 2) absolute maps on the fitted
      grid (images are resampled to it when (h, w) != (H, W)).
    frames: rows (default: first, middle and last frame).
    masks: optional (T, h, w) propagated labels, outlined on I_0 o phi_t
      (endo white, epi black, LA magenta).
  """
  images = np.asarray(images, np.float64)
  phi = np.asarray(phi, np.float64)
  t, h, w = phi.shape[:3]
  if images.shape[1:] != (h, w):
    zoom = (h / images.shape[1], w / images.shape[2])
    images = np.stack([ndimage.zoom(im, zoom, order=1) for im in images])[:, :h, :w]
  frames = [0, (t - 1) // 2, t - 1] if frames is None else list(frames)
  frames = sorted(set(frames))
  grid_step = grid_step or max(2, h // 16)
  fig, axes = plt.subplots(len(frames), 4, figsize=(4 * panel + 0.8, panel * len(frames)),
                           squeeze=False)
  for i, k in enumerate(frames):
    warped = _warp_np(images[0], phi[k])
    jdet = jacobian_determinant_np(phi[k])
    a = axes[i]
    a[0].imshow(images[k], cmap="gray", vmin=0, vmax=1)
    a[0].set_ylabel(f"frame {k}", fontsize=9)
    a[1].imshow(warped, cmap="jet", vmin=0, vmax=1)
    if masks is not None and masks.shape[1:] == (h, w):
      draw_structures(a[1], masks[k], lw=0.9, outlines=_ON_JET)
    draw_grid(a[2], phi[k], step=grid_step, color="tab:blue")
    lim = max(abs(float(np.min(jdet)) - 1), abs(float(np.max(jdet)) - 1), 1e-3)
    im = a[3].imshow(jdet, cmap="RdBu_r", vmin=1 - lim, vmax=1 + lim)
    fig.colorbar(im, ax=a[3], fraction=0.046)
    a[3].set_title(f"min {np.min(jdet):.2f}, folding {100 * np.mean(jdet <= 0):.2f}%",
                   fontsize=8)
    if i == 0:
      a[0].set_title("I_t (target)", fontsize=9)
      a[1].set_title("I_0 o phi_t" + (" (+ m_t)" if masks is not None else ""), fontsize=9)
      a[2].set_title("deformed grid phi_t", fontsize=9)
      a[3].set_title("det D phi_t\n" + a[3].get_title(), fontsize=8)
    for ax in a:
      ax.set_xticks([])
      ax.set_yticks([])
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  return fig


# ---------------------------------------------------------------------------
# Figures from files


def _read_group(path: str, key: str) -> dict[str, Any]:
  with h5py.File(path, "r") as f:
    if key not in f:
      return {}
    g = f[key]
    out = {k: np.asarray(g[k][...]) for k in ("img", "gt", "pred", "flow") if k in g}
    out["attrs"] = {k: hdf5.attr_value(v) for k, v in g.attrs.items()}
  return out


def pick_key(data: str, preds: Mapping[str, str]) -> str:
  """The first sequence of `data` that every prediction file holds with status ok."""
  keys = hdf5.list_keys(data)
  for k in keys:
    ok = True
    for p in preds.values():
      with h5py.File(p, "r") as f:
        if k not in f or "pred" not in f[k] or hdf5.attr_value(
            f[k].attrs.get("status", "ok")) == "failed":
          ok = False
          break
    if ok:
      return k
  return keys[0]


def write_figures(data: str, preds: Mapping[str, str], out_dir: str, key: str | None = None,
                  num_frames: int = 5) -> list[str]:
  """Fig. 2 / 3b / 4 style PNGs of one sequence into `out_dir`.

  fig2_contours.png (rows: ground truth and each method; columns: frames ED ->
  ES), fig3b_lv_length.png (LV length over time), and fig4_deformation.png when
  a prediction file stores a flow (the first such method).

  Returns:
    The written paths.
  """
  key = key or pick_key(data, preds)
  d = _read_group(data, key)
  if "img" not in d:
    raise InputError(data, f"no img for {key}")
  img = d["img"]
  t = img.shape[0]
  spacing = tuple(float(s) for s in np.ravel(d["attrs"].get("voxelspacing", (1.0, 1.0))))
  labels: dict[str, np.ndarray] = {}
  if "gt" in d:
    labels["ground truth"] = d["gt"]
  flows = {}
  for name, p in preds.items():
    g = _read_group(p, key)
    if "pred" in g and g["pred"].shape == img.shape:
      labels[name] = g["pred"]
      if "flow" in g:
        flows[name] = g["flow"]
  frames = sorted(set(np.linspace(0, t - 1, min(num_frames, t)).round().astype(int).tolist()))
  os.makedirs(out_dir, exist_ok=True)
  paths = [save(contour_figure(img, labels, frames, title=key),
                      os.path.join(out_dir, "fig2_contours.png"))]
  curves = {n: lv_length_mm(lab, spacing) for n, lab in labels.items()}
  paths.append(save(curve_figure(curves, "LV length (mm)", title=key),
                          os.path.join(out_dir, "fig3b_lv_length.png")))
  if flows:
    name, phi = next(iter(flows.items()))
    paths.append(save(
        registration_figure(img, phi, masks=labels[name], title=f"{name}: {key}"),
        os.path.join(out_dir, "fig4_deformation.png")))
  return paths
