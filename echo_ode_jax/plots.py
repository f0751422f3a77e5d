"""Figures (matplotlib, Agg backend): deformation grids, contours, attribute curves."""
from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from echo_ode_jax._atomic import atomic_path  # noqa: E402

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
