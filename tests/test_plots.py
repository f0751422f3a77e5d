"""Figure functions write non-empty PNGs; the LV length curve on hand-made shapes."""
import os

import h5py
import numpy as np

from echo_ode_jax import plots
from echo_ode_jax.data import hdf5, synthetic

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
  with open(path, "rb") as f:
    head = f.read(8)
  return head == PNG and os.path.getsize(path) > 2000


def _rect_labels(t_frames=4, size=40):
  """LV rows [8+t, 26-t), cols [12+t, 28-t); myocardium around it, open at the bottom."""
  lab = np.zeros((t_frames, size, size), np.uint8)
  for t in range(t_frames):
    r0, r1, c0, c1 = 8 + t, 26 - t, 12 + t, 28 - t
    lab[t, r0 - 3:r1, c0 - 3:c1 + 3] = 2
    lab[t, r0:r1, c0:c1] = 1
    lab[t, r1:r1 + 6, c0:c1] = 3
  return lab


def test_lv_length_mm_on_rectangles():
  lab = _rect_labels()
  sp = (0.5, 0.25)
  got = plots.lv_length_mm(lab, sp)
  # Base points: the bottom LV corners (r1-1, c0), (r1-1, c1-1); apex: a top
  # corner. Length = hypot((r1-1-r0) * 0.5, (c1-1-c0)/2 * 0.25).
  expect = [np.hypot((17 - 2 * t) * 0.5, (7.5 - t) * 0.25) for t in range(4)]
  np.testing.assert_allclose(got, expect, rtol=1e-12)
  lab[2] = 255                                  # unannotated frame
  lab[3] = 0                                    # no LV
  got = plots.lv_length_mm(lab, sp)
  assert np.isnan(got[2]) and np.isnan(got[3]) and np.isfinite(got[:2]).all()


def test_figures_write_pngs(tmp_path):
  lab = _rect_labels()
  img = (lab > 0).astype(np.float32) * 0.6
  gt = lab.copy()
  gt[1:-1] = 255
  frames = [0, 1, 3]
  p = plots.save(plots.contour_figure(img, {"ground truth": gt, "method": lab}, frames,
                                      title="x"), tmp_path / "c.png")
  assert _is_png(p)
  curves = {"ground truth": plots.lv_length_mm(lab), "method": plots.lv_length_mm(lab) + 1}
  assert _is_png(plots.save(plots.curve_figure(curves, "LV length (mm)"), tmp_path / "l.png"))
  # A contraction about the centre: det = s^2 everywhere.
  t, s = 4, 40
  g = np.stack(np.meshgrid(np.arange(s), np.arange(s), indexing="ij"), -1).astype(np.float32)
  c = (s - 1) / 2
  phi = np.stack([c + (1 + 0.1 * k) * (g - c) for k in range(t)])
  assert _is_png(plots.save(plots.registration_figure(img, phi, masks=lab), tmp_path / "r.png"))
  # The fitted grid may be coarser than the data grid.
  assert _is_png(plots.save(plots.registration_figure(img, phi[:, ::2, ::2] / 2),
                            tmp_path / "r2.png"))
  from echo_ode_jax.metrics import jacobian_determinant_np
  jd = jacobian_determinant_np(phi[-1])
  np.testing.assert_allclose(jd, 1.3 ** 2, rtol=1e-5)
  assert _is_png(plots.save(plots.deformation_figure(phi[-1], jd, image=img[0],
                                                     warped=img[-1], mask0=lab[0],
                                                     mask_t=lab[-1]), tmp_path / "d.png"))


def test_write_figures_from_files(tmp_path):
  data = tmp_path / "data.h5"
  synthetic.make_dataset(data, 2, size=32, seed=5, num_frames=4, progress=False)
  pred = tmp_path / "pred.h5"
  with h5py.File(pred, "w") as f:
    for key in hdf5.list_keys(data):
      g = f.require_group(key)
      g.create_dataset("pred", data=hdf5.read_sequence(data, key).gt)
      g.create_dataset("flow", data=hdf5.read_dataset(data, key, "flow_true"))
  out = tmp_path / "figs"
  paths = plots.write_figures(str(data), {"true flow": str(pred)}, str(out))
  assert [os.path.basename(p) for p in paths] == [
      "fig2_contours.png", "fig3b_lv_length.png", "fig4_deformation.png"]
  assert all(_is_png(p) for p in paths)
