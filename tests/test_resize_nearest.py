"""The nearest-neighbour label resizer (data.resample.resize_nearest) and its
users (runner.resize order 0, segmenters resize_labels, metrics.resample_nearest)
against scipy and hand-computed index maps."""
import numpy as np
import pytest
from scipy import ndimage

from echo_ode_jax import metrics, runner
from echo_ode_jax.data.resample import nearest_index, resize_nearest
from echo_ode_jax.segmenters.train import resize_labels

# (input side, output side): even and odd sizes, down- and up-sampling, exact halves.
PAIRS = [(256, 128), (128, 256), (100, 64), (64, 100), (37, 16), (16, 37), (5, 3), (3, 5),
         (7, 4), (4, 7), (12, 8), (8, 12), (65, 33), (1, 3), (3, 1)]


def _zoom_ref(x, shape):
  """scipy.ndimage.zoom, order 0, pixel areas aligned (grid_mode), per 2D frame."""
  h, w = x.shape[-2:]
  flat = x.reshape((-1, h, w))
  out = [ndimage.zoom(f, (shape[0] / h, shape[1] / w), order=0, grid_mode=True,
                      mode="grid-constant") for f in flat]
  return np.stack(out).reshape(x.shape[:-2] + tuple(shape))


@pytest.mark.parametrize("n_in,n_out", PAIRS)
def test_resize_nearest_matches_scipy_zoom(n_in, n_out):
  rng = np.random.default_rng(n_in * 1000 + n_out)
  x = rng.integers(0, 4, size=(2, n_in, n_in + 3)).astype(np.uint8)
  shape = (n_out, n_out + 1)
  got = resize_nearest(x, shape)
  assert got.dtype == np.uint8 and got.shape == (2,) + shape
  np.testing.assert_array_equal(got, _zoom_ref(x, shape))


@pytest.mark.parametrize("n_in,n_out", PAIRS)
def test_resizers_pick_the_same_pixels(n_in, n_out):
  """runner.resize(order 0), resize_labels and metrics.resample_nearest agree
  with scipy's zoom on a ramp (each output pixel shows its source index)."""
  ramp = np.add.outer(np.arange(n_in) * 1000, np.arange(n_in)).astype(np.int32)
  ref = _zoom_ref(ramp[None], (n_out, n_out))[0]
  np.testing.assert_array_equal(runner.resize(ramp, (n_out, n_out), 0), ref)
  small = (ramp[None] % 251).astype(np.uint8)
  np.testing.assert_array_equal(resize_labels(small, n_out)[0], ref % 251)
  # resample_nearest: output side round(n * spacing / target) = n_out.
  np.testing.assert_array_equal(
      metrics.resample_nearest(ramp, (n_out / n_in, n_out / n_in), (1.0, 1.0)), ref)


def test_nearest_index_hand_computed():
  # Centre of output pixel i at (i + 0.5) * n_in / n_out input pixels.
  assert nearest_index(4, 2).tolist() == [1, 3]            # centres 1.0, 3.0
  assert nearest_index(2, 4).tolist() == [0, 0, 1, 1]      # 0.25, 0.75, 1.25, 1.75
  assert nearest_index(5, 3).tolist() == [0, 2, 4]         # 0.83, 2.5, 4.17
  assert nearest_index(3, 5).tolist() == [0, 0, 1, 2, 2]   # 0.3, 0.9, 1.5, 2.1, 2.7
  assert nearest_index(6, 4).tolist() == [0, 2, 3, 5]      # 0.75, 2.25, 3.75, 5.25
  x = np.array([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
  np.testing.assert_array_equal(resize_nearest(x, (2, 2)), [[1, 3], [9, 11]])  # rows 0.75, 2.25


def test_resize_nearest_same_shape_is_identity():
  x = np.arange(12).reshape(3, 4)
  assert resize_nearest(x, (3, 4)) is x
