"""Tests of the 2D segmenters: models, losses, augmentation, training, checkpoints, prediction."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echo_ode_jax.data.hdf5 import Sequence, list_keys, set_root_attrs, write_sequence
from echo_ode_jax.errors import InputError
from echo_ode_jax.segmenters import MODELS, get_model
from echo_ode_jax.segmenters._layers import max_pool_2x2_with_argmax, max_unpool_2x2
from echo_ode_jax.segmenters.deeplabv3 import ResNet
from echo_ode_jax.segmenters.predict import predict_sequences, write_predictions
from echo_ode_jax.segmenters.train import (ModelState, TrainConfig, augment_batch, create_state,
                                           hard_dice, load_frames, load_model_state,
                                           make_train_step, resize_labels, rng_key, save_model,
                                           segmentation_loss, split_keys, train)

REPO = Path(__file__).resolve().parents[1]

# Tiny configurations (fast on CPU).
TINY = {
    "unet": {"widths": (4, 8, 16)},
    "enet": {"widths": (8, 16, 16), "stage1_repeats": 1, "num_stage3": 0, "stage23_blocks": 3},
    "deeplabv3": {"base_width": 4, "aspp_features": 8, "output_stride": 8},
}


# ----------------------------------------------------------------------------
# Toy data: an elliptic "LV" cavity, a ring "myocardium", an "LA" below, noise.


def toy_frames(rng, size, num_frames):
  """(T, size, size) float32 images and uint8 labels (every frame labelled)."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  cy, cx = 0.4 + rng.uniform(-0.05, 0.05), 0.5 + rng.uniform(-0.05, 0.05)
  imgs, lbls = [], []
  for t in range(num_frames):
    s = 1.0 - 0.25 * t / max(1, num_frames - 1)
    ry, rx = 0.24 * s, 0.13 * s
    cav = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    epi = ((yy - cy) / (ry + 0.06)) ** 2 + ((xx - cx) / (rx + 0.06)) ** 2 <= 1
    la = ((yy - 0.83) / 0.1) ** 2 + ((xx - cx) / 0.12) ** 2 <= 1
    lbl = np.zeros((size, size), np.uint8)
    lbl[la & ~epi] = 3
    lbl[epi] = 2
    lbl[cav] = 1
    img = np.choose(lbl, [0.3, 0.05, 0.8, 0.1]) + rng.normal(0, 0.08, (size, size))
    imgs.append(np.clip(img, 0, 1).astype(np.float32))
    lbls.append(lbl)
  return np.stack(imgs), np.stack(lbls)


def toy_file(path, num_patients=6, size=32, num_frames=4, seed=0, annotate_all=False):
  """HDF5 file in the project layout; gt only at ED (0) and ES (T-1) unless annotate_all."""
  rng = np.random.default_rng(seed)
  with h5py.File(path, "w") as f:
    set_root_attrs(f, size)
    for p in range(num_patients):
      img, gt = toy_frames(rng, size, num_frames)
      if not annotate_all:
        gt[1:-1] = 255
      attrs = {"voxelspacing": np.array([0.3, 0.3]), "ed_index": 0,
               "es_index": num_frames - 1}
      write_sequence(f, Sequence(f"patient{p + 1:04d}", "4CH", img, gt, attrs))
  return path


# ----------------------------------------------------------------------------
# Models


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_shapes_and_batchnorm(name, rng):
  model = get_model(name, **TINY[name])
  hw = (36, 44)  # not a multiple of the strides: padded inside, cropped back
  x = jnp.asarray(rng.uniform(0, 1, (3,) + hw + (1,)), jnp.float32)
  variables = _random_variables(model, x.shape, rng)
  assert set(variables) == {"params", "batch_stats"}
  ev = jax.jit(lambda v, x: model.apply(v, x, train=False))
  tr = jax.jit(lambda v, x, k: model.apply(v, x, train=True, mutable=["batch_stats"],
                                           rngs={"dropout": k}))
  y = ev(variables, x)
  assert y.shape == (3,) + hw + (4,) and y.dtype == jnp.float32
  # Train mode uses batch statistics and updates the running ones ...
  y_tr, upd = tr(variables, x, rng_key(2))
  assert y_tr.shape == y.shape
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"],
                         upd["batch_stats"])
  assert all(jax.tree.leaves(changed))
  x_other = x.at[1:].set(0.0)
  assert not np.allclose(tr(variables, x_other, rng_key(2))[0][0], y_tr[0], atol=1e-4)
  # ... eval mode uses the running ones: a sample's output ignores the batch.
  np.testing.assert_allclose(ev(variables, x_other)[0], y[0], rtol=1e-4, atol=1e-5)


def _random_variables(model, shape, rng):
  """Random variables of the right structure (skips compiling model.init)."""
  shapes = _param_shapes(model, shape)
  def fill(path, s):
    name = jax.tree_util.keystr(path)
    if "batch_stats" in name:
      # Not flax's (0, 1): a layer whose input is all zero (every channel dead after a ReLU,
      # common at these widths) has batch statistics (0, 0) and must still move them.
      return jnp.full(s.shape, 2.0 if "var" in name else 0.5, s.dtype)
    fan_in = int(np.prod(s.shape[:-1])) if len(s.shape) > 1 else 1
    return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), s.shape), s.dtype)
  return jax.tree_util.tree_map_with_path(fill, shapes)


def _param_shapes(module, shape):
  return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(shape)))


def test_unet_parameter_count_by_hand():
  w0, w1, c = 4, 8, 4
  v = _param_shapes(get_model("unet", widths=(w0, w1)), (1, 16, 16, 1))
  n = sum(a.size for a in jax.tree.leaves(v["params"]))
  bn = lambda f: 2 * f  # scale + bias
  expected = (9 * 1 * w0 + bn(w0) + 9 * w0 * w0 + bn(w0)        # encoder level
              + 9 * w0 * w1 + bn(w1) + 9 * w1 * w1 + bn(w1)     # bottleneck
              + 2 * 2 * w1 * w0 + w0                            # 2x2 transposed conv
              + 9 * 2 * w0 * w0 + bn(w0) + 9 * w0 * w0 + bn(w0)  # decoder level
              + w0 * c + c)                                     # 1x1 to logits
  assert n == expected == 1692
  # Running mean + variance per BatchNorm channel.
  assert sum(a.size for a in jax.tree.leaves(v["batch_stats"])) == 2 * (4 * w0 + 2 * w1)


def test_enet_initial_block_and_size():
  v = _param_shapes(get_model("enet"), (1, 64, 64, 1))  # paper configuration
  init = v["params"]["InitialBlock_0"]
  # 15 3x3 filters on 1 channel, concatenated with the max-pooled input -> 16.
  assert init["Conv_0"]["kernel"].shape == (3, 3, 1, 15)
  assert init["BatchNorm_0"]["scale"].shape == (16,)
  n = sum(a.size for a in jax.tree.leaves(v["params"]))
  assert 0.3e6 < n < 0.4e6  # the paper's ENet has 0.37 M parameters


@pytest.mark.parametrize("os_, expected", [(8, 8), (16, 4), (32, 2)])
def test_resnet_output_stride(os_, expected):
  net = ResNet(depth=18, base_width=4, output_stride=os_)
  x = jnp.zeros((1, 64, 64, 1))
  (low, high), _ = jax.eval_shape(lambda: net.init_with_output(jax.random.PRNGKey(0), x))
  assert low.shape == (1, 16, 16, 4)
  assert high.shape == (1, expected, expected, 32)


def test_resnet_depths_differ():
  counts = {}
  for d in (18, 34, 50):
    v = _param_shapes(ResNet(depth=d, base_width=4), (1, 32, 32, 1))
    counts[d] = len(jax.tree.leaves(v["params"]))
  # Conv + BN leaves: 18 -> 8 basic blocks, 34 -> 16, 50 -> 16 bottlenecks (3 convs).
  assert counts[18] < counts[34] < counts[50]
  # Stem (conv + BN = 3 leaves) + blocks (3 leaves per ConvBN) + 3 projection shortcuts.
  assert counts[18] == 3 + 3 * (2 * 8 + 3)
  assert counts[50] == 3 + 3 * (3 * 16 + 4)


def test_max_unpool_by_hand():
  x = jnp.array([[1., 5., 0., 2.],
                 [3., 4., 7., 1.],
                 [0., 0., 9., 9.],
                 [0., 6., 8., 9.]])[None, :, :, None]
  pooled, idx = max_pool_2x2_with_argmax(x)
  np.testing.assert_array_equal(pooled[0, :, :, 0], [[5., 7.], [6., 9.]])
  np.testing.assert_array_equal(idx[0, :, :, 0], [[1, 2], [3, 0]])  # first max on ties
  up = max_unpool_2x2(pooled, idx)
  np.testing.assert_array_equal(up[0, :, :, 0], [[0., 5., 0., 0.],
                                                 [0., 0., 7., 0.],
                                                 [0., 0., 9., 0.],
                                                 [0., 6., 0., 0.]])


def test_get_model_unknown():
  with pytest.raises(ValueError, match="unknown segmenter"):
    get_model("segformer")


# ----------------------------------------------------------------------------
# Losses, metrics, augmentation, data


def test_loss_by_hand():
  labels = jnp.array([[[0, 1], [1, 255]]])
  logits = jnp.zeros((1, 2, 2, 4))  # probabilities 1/4 everywhere
  d1 = (2 * 0.5 + 1) / (0.75 + 2 + 1)  # class 1: two pixels
  d2 = (0 + 1) / (0.75 + 0 + 1)        # classes 2, 3: absent
  dice = 1 - (d1 + 2 * d2) / 3
  np.testing.assert_allclose(segmentation_loss(logits, labels, "dice"), dice, rtol=1e-6)
  np.testing.assert_allclose(segmentation_loss(logits, labels, "dice_ce"),
                             dice + math.log(4), rtol=1e-6)
  perfect = 100.0 * jax.nn.one_hot(jnp.array([[[1, 2], [3, 0]]]), 4)
  assert float(segmentation_loss(perfect, jnp.array([[[1, 2], [3, 0]]]), "dice_ce")) < 1e-4


def test_hard_dice_by_hand():
  pred = np.array([[1, 1], [0, 2]])
  gt = np.array([[1, 0], [1, 2]])
  assert hard_dice(pred, gt, (1,)) == pytest.approx(0.5)
  assert hard_dice(pred, gt, (1, 2)) == pytest.approx(4 / 6)
  assert hard_dice(pred, gt, (3,)) == 1.0
  gt_ignored = np.array([[1, 255], [1, 2]])  # the (0, 1) pixel no longer counts
  assert hard_dice(pred, gt_ignored, (1,)) == pytest.approx(2 / 3)
  assert float(hard_dice(jnp.asarray(pred), jnp.asarray(gt), (1,))) == pytest.approx(0.5)


def test_augment_identity_gamma_and_determinism(rng):
  img = rng.uniform(0.05, 1, (2, 16, 16, 1)).astype(np.float32)
  lbl = rng.integers(0, 4, (2, 16, 16)).astype(np.int32)
  key = rng_key(3)
  ident = TrainConfig(rot_deg=0.0, scale=0.0, shift=0.0, gamma=1.0)
  a, b = augment_batch(key, img, lbl, ident)
  np.testing.assert_allclose(a, img, atol=1e-6)
  np.testing.assert_array_equal(b, lbl)
  gam = TrainConfig(rot_deg=0.0, scale=0.0, shift=0.0, gamma=1.5)
  a, b = augment_batch(key, img, lbl, gam)
  ratio = np.log(np.asarray(a)) / np.log(img)  # one exponent per sample
  assert np.ptp(ratio[0]) < 1e-3 and 1 / 1.5 - 1e-4 <= ratio[0].mean() <= 1.5 + 1e-4
  np.testing.assert_array_equal(b, lbl)
  cfg = TrainConfig()
  a1, b1 = augment_batch(key, img, lbl, cfg)
  a2, b2 = augment_batch(key, img, lbl, cfg)
  np.testing.assert_array_equal(a1, a2)
  np.testing.assert_array_equal(b1, b2)
  assert set(np.unique(b1)) <= {0, 1, 2, 3}
  assert not np.array_equal(a1, augment_batch(rng_key(4), img, lbl, cfg)[0])


def test_augment_moves_image_and_labels_together():
  """Rotation, scaling and shift: where the augmented label is constant over a
  5x5 neighbourhood (wider than the bilinear footprint at zoom <= 1.2), the
  image (coded as label / 3) carries the same label."""
  lbl = np.zeros((4, 48, 48), np.int32)
  lbl[:, 8:30, 10:26] = 1
  lbl[:, 8:30, 26:38] = 2
  lbl[:, 30:42, 12:36] = 3
  img = (lbl / 3.0).astype(np.float32)[..., None]
  cfg = TrainConfig(rot_deg=30.0, scale=0.2, shift=0.1, gamma=1.0)
  a, b = map(np.asarray, augment_batch(rng_key(5), img, lbl, cfg))
  assert np.mean(b != lbl) > 0.05                     # the maps really moved
  pad = np.pad(b, ((0, 0), (2, 2), (2, 2)), mode="edge")
  nbrs = np.stack([pad[:, i:i + 48, j:j + 48] for i in range(5) for j in range(5)])
  interior = np.all(nbrs == b[None], axis=0)
  assert interior.mean() > 0.5
  np.testing.assert_allclose(a[..., 0][interior], b[interior] / 3.0, atol=1e-4)


def test_resize_labels_nearest():
  lbl = np.array([[[0, 1], [2, 3]]], np.uint8)
  np.testing.assert_array_equal(resize_labels(lbl, 4)[0], [[0, 0, 1, 1], [0, 0, 1, 1],
                                                           [2, 2, 3, 3], [2, 2, 3, 3]])


def test_load_frames_annotated_only(tmp_path):
  path = toy_file(tmp_path / "d.h5", num_patients=2, size=32, num_frames=5)
  x, y, ids = load_frames(path, list_keys(path), 16)
  assert x.shape == (4, 16, 16, 1) and y.shape == (4, 16, 16)
  assert ids == [("patient0001/4CH", 0), ("patient0001/4CH", 4),
                 ("patient0002/4CH", 0), ("patient0002/4CH", 4)]
  assert set(np.unique(y)) <= {0, 1, 2, 3}


def test_load_frames_bad_labels(tmp_path):
  path = toy_file(tmp_path / "d.h5", num_patients=1)
  with h5py.File(path, "a") as f:
    f["patient0001/4CH/gt"][0, 0, 0] = 7
  with pytest.raises(InputError, match="d.h5.*labels \\[7\\]"):
    load_frames(path, list_keys(path), 32)


def test_split_keys(tmp_path):
  path = toy_file(tmp_path / "d.h5", num_patients=10, size=16, num_frames=2)
  tr, va = split_keys(path)
  assert len(va) == 1 and len(tr) == 9 and not set(tr) & set(va)
  assert split_keys(path) == (tr, va)  # deterministic
  spl = tmp_path / "s.json"
  spl.write_text(json.dumps({"train": ["patient0001", "patient2", "3"],
                             "valid": ["patient0010", "patient0099"]}))
  tr, va = split_keys(path, spl)
  assert tr == ["patient0001/4CH", "patient0002/4CH", "patient0003/4CH"]
  assert va == ["patient0010/4CH"]
  spl.write_text(json.dumps({"train": ["patient0001"], "valid": ["patient1"]}))
  with pytest.raises(InputError, match="s.json: patients in both"):
    split_keys(path, spl)
  spl.write_text("{not json")
  with pytest.raises(InputError, match="s.json: not valid JSON"):
    split_keys(path, spl)


def _camus_dir() -> Path:
  env = os.environ.get("ECHO_ODE_CAMUS_DIR")
  return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data" / "camus_4ch_edes"


@pytest.mark.camus
def test_split_keys_camus_splits_file(tmp_path):
  splits = _camus_dir() / "splits.json"
  if not splits.exists():
    pytest.skip(f"CAMUS splits.json not found at {splits} (set ECHO_ODE_CAMUS_DIR)")
  names = json.loads(splits.read_text())
  with h5py.File(tmp_path / "d.h5", "w") as f:
    for p in names["train"][:3] + names["valid"][:2]:
      write_sequence(f, Sequence(p, "4CH", np.zeros((2, 8, 8), np.float32), None, {}))
  tr, va = split_keys(tmp_path / "d.h5", splits)
  assert tr == [f"{p}/4CH" for p in sorted(names["train"][:3])]
  assert va == [f"{p}/4CH" for p in sorted(names["valid"][:2])]


# ----------------------------------------------------------------------------
# Training, checkpoints


@pytest.mark.parametrize("name", [
    "unet",
    pytest.param("enet", marks=pytest.mark.slow),  # ~30 s of compilation each
    pytest.param("deeplabv3", marks=pytest.mark.slow)])
def test_few_steps_reduce_loss(name):
  rng = np.random.default_rng(0)
  img, lbl = toy_frames(rng, 32, 4)
  kw = {"widths": [4, 8]} if name == "unet" else TINY[name]  # as in the training tests
  cfg = TrainConfig(model=name, model_kwargs=kw, size=32, lr=1e-2)
  state = create_state(cfg, 0)
  step = make_train_step(cfg)
  losses = []
  for i in range(25):
    state, loss = step(state, img[..., None], lbl, rng_key(i))
    losses.append(float(loss))
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_save_load_identical_logits(tmp_path):
  rng = np.random.default_rng(0)
  img, _ = toy_frames(rng, 32, 4)
  cfg = TrainConfig(model="unet", model_kwargs=TINY["unet"], size=32)
  state = create_state(cfg, 0)
  # Non-trivial parameters and running statistics.
  noise = lambda a: a + rng.normal(0, 0.1, a.shape).astype(np.float32)
  state = state.replace(params=jax.tree.map(noise, state.params),
                        batch_stats=jax.tree.map(lambda a: np.abs(noise(a)), state.batch_stats))
  (tmp_path / "config.json").write_text(cfg.to_json())
  save_model(tmp_path / "best.msgpack", state, 3, {"loss": 0.5})
  loaded = load_model_state(tmp_path, "best")
  assert loaded.epoch == 3 and loaded.metrics == {"loss": 0.5}
  x = jnp.asarray(img[..., None])
  # The same compiled function, once with the saved and once with the loaded variables.
  original = ModelState(loaded.model, {"params": state.params, "batch_stats": state.batch_stats},
                        cfg, jit_cache=loaded.jit_cache)
  np.testing.assert_array_equal(loaded.logits(x), original.logits(x))
  assert len(loaded.jit_cache) == 1


def test_train_resume_and_best(tmp_path):
  data = toy_file(tmp_path / "d.h5", num_patients=6, size=32, num_frames=3)
  cfg = TrainConfig(model="unet", model_kwargs={"widths": [4, 8]}, size=32, epochs=1,
                    batch_size=4, lr=1e-2)
  wd = tmp_path / "wd"
  train(cfg, data, wd)
  hist = json.loads((wd / "history.json").read_text())
  assert [h["epoch"] for h in hist] == [1]
  assert set(os.listdir(wd)) == {"config.json", "last.msgpack", "best.msgpack", "history.json"}
  saved = json.loads((wd / "config.json").read_text())
  assert saved["model"] == "unet" and saved["data"] == "d.h5"  # file name only
  # Same settings (a tuple where JSON holds a list), more epochs: continues.
  train(TrainConfig(**{**cfg.__dict__, "epochs": 3, "model_kwargs": {"widths": (4, 8)}}),
        data, wd)
  hist = json.loads((wd / "history.json").read_text())
  assert [h["epoch"] for h in hist] == [1, 2, 3]
  # 5 train patients x 2 annotated frames = 10 frames -> 2 steps of 4 per epoch.
  assert load_model_state(wd, "last").epoch == 3
  best = load_model_state(wd, "best")
  best_epoch = min(hist, key=lambda h: h["val_loss"])["epoch"]
  assert best.epoch == best_epoch
  assert best.metrics["loss"] == pytest.approx(min(h["val_loss"] for h in hist))
  train(TrainConfig(**{**cfg.__dict__, "epochs": 3}), data, wd)  # nothing left to do
  assert len(json.loads((wd / "history.json").read_text())) == 3
  with pytest.raises(InputError, match="config.json: workdir holds a run with different"):
    train(TrainConfig(**{**cfg.__dict__, "model": "enet"}), data, wd)


def test_early_stopping(tmp_path):
  data = toy_file(tmp_path / "d.h5", num_patients=4, size=32, num_frames=2)
  # lr = 0 and no BatchNorm: the validation loss never improves after epoch 1.
  cfg = TrainConfig(model="unet", model_kwargs={"widths": [4, 8], "use_bn": False},
                    size=32, epochs=10,
                    batch_size=4, lr=0.0, patience=2, augment=False)
  train(cfg, data, tmp_path / "wd")
  hist = json.loads((tmp_path / "wd" / "history.json").read_text())
  assert [h["epoch"] for h in hist] == [1, 2, 3]


# ----------------------------------------------------------------------------
# Prediction


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("seg")
  data = toy_file(tmp / "d.h5", num_patients=4, size=32, num_frames=3)
  cfg = TrainConfig(model="unet", model_kwargs={"widths": [4, 8]}, size=32, epochs=1,
                    batch_size=4, lr=1e-2)
  train(cfg, data, tmp / "wd")
  return tmp / "wd"


def test_predict_sequences_shapes_and_resize(trained_workdir, tmp_path):
  state = load_model_state(trained_workdir)
  data = toy_file(tmp_path / "big.h5", num_patients=2, size=40, num_frames=5)
  preds = predict_sequences(state, data, batch_size=3)
  assert sorted(preds) == list_keys(data)
  for p in preds.values():
    assert p.shape == (5, 40, 40) and p.dtype == np.uint8 and p.max() <= 3
  one = predict_sequences(state, data, ["patient0002/4CH"], batch_size=16)
  np.testing.assert_array_equal(one["patient0002/4CH"], preds["patient0002/4CH"])


def test_predict_cli_layout(trained_workdir, tmp_path):
  data = toy_file(tmp_path / "d.h5", num_patients=2, size=32, num_frames=5)
  out = tmp_path / "pred.h5"
  cmd = [sys.executable, str(REPO / "experiments" / "predict_segmenter.py"),
         f"--data={data}", f"--workdir={trained_workdir}", f"--out={out}", "--batch_size=4"]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  with h5py.File(out, "r") as f, h5py.File(data, "r") as d:
    assert f.attrs["size"] == 32 and "format_version" in f.attrs
    assert sorted(f) == ["patient0001", "patient0002"]
    for key in ("patient0001/4CH", "patient0002/4CH"):
      assert list(f[key]) == ["pred"]
      pred = f[key]["pred"]
      assert pred.shape == (5, 32, 32) and pred.dtype == np.uint8
      assert f[key].attrs["es_index"] == d[key].attrs["es_index"] == 4
      np.testing.assert_array_equal(f[key].attrs["voxelspacing"], [0.3, 0.3])
      assert f[key].attrs["pred_model"] == "unet"
      assert json.loads(f[key].attrs["pred_config"])["model_kwargs"] == {"widths": [4, 8]}
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
  # Bad input: one line naming the file, exit status 2.
  r = subprocess.run(cmd[:2] + [f"--data={tmp_path / 'missing.h5'}"] + cmd[3:],
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'missing.h5'}: file does not exist"


def test_write_predictions_atomic_on_error(trained_workdir, tmp_path):
  state = load_model_state(trained_workdir)
  data = toy_file(tmp_path / "d.h5", num_patients=1, size=32, num_frames=2)
  out = tmp_path / "pred.h5"
  out.write_bytes(b"old")
  with pytest.raises(InputError, match="no group"):
    write_predictions(state, data, out, ["patient0001/4CH", "nobody/4CH"])
  assert out.read_bytes() == b"old"


# ----------------------------------------------------------------------------
# End to end on the project's synthetic sequences


@pytest.mark.slow
def test_unet_learns_synthetic_lv(tmp_path):
  from echo_ode_jax.data.synthetic import make_dataset
  train_h5, test_h5 = tmp_path / "train.h5", tmp_path / "test.h5"
  make_dataset(train_h5, num=8, size=64, seed=0, num_frames=12, store_flow=False,
               progress=False)
  make_dataset(test_h5, num=3, size=64, seed=100, num_frames=12, store_flow=False,
               progress=False)
  cfg = TrainConfig(model="unet", model_kwargs={"widths": [8, 16, 32, 64]}, size=64,
                    epochs=30, batch_size=8, lr=3e-3, patience=30)
  train(cfg, train_h5, tmp_path / "wd")  # 7 train sequences x 12 frames: 10 steps/epoch
  preds = predict_sequences(load_model_state(tmp_path / "wd"), test_h5)
  with h5py.File(test_h5, "r") as f:
    for key, pred in preds.items():
      gt = f[key]["gt"][...]
      a, b = pred == 1, gt == 1
      dice = 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))
      assert dice > 0.8, (key, dice)


@pytest.mark.slow
def test_train_cli_and_resume(tmp_path):
  data = toy_file(tmp_path / "d.h5", num_patients=4, size=32, num_frames=2)
  spl = tmp_path / "splits.json"
  spl.write_text(json.dumps({"train": ["patient0001", "patient0002", "patient0003"],
                             "valid": ["patient0004"]}))
  cmd = [sys.executable, str(REPO / "experiments" / "train_segmenter.py"), f"--data={data}",
         "--model=enet", f"--workdir={tmp_path / 'wd'}", "--epochs=1", "--batch_size=2",
         f"--splits={spl}", "--model_kwargs=" + json.dumps(TINY["enet"])]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "ETA" in r.stderr and "dice_endo=" in r.stderr
  cfg = json.loads((tmp_path / "wd" / "config.json").read_text())
  assert cfg["model"] == "enet" and cfg["size"] == 32 and cfg["splits"] == "splits.json"
  cmd = [c if not c.startswith("--epochs") else "--epochs=2" for c in cmd]
  r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "resuming" in r.stderr
  hist = json.loads((tmp_path / "wd" / "history.json").read_text())
  assert [h["epoch"] for h in hist] == [1, 2]


def test_bad_input_names_the_file(trained_workdir, tmp_path):
  state = load_model_state(trained_workdir)
  missing = tmp_path / "missing.h5"
  with pytest.raises(InputError, match="missing.h5: file does not exist"):
    write_predictions(state, missing, tmp_path / "p.h5", ["patient0001/4CH"])
  (tmp_path / "text.h5").write_text("not hdf5")
  with pytest.raises(InputError, match="text.h5: (not an HDF5 file|cannot open as HDF5)"):
    train(TrainConfig(size=32), tmp_path / "text.h5", tmp_path / "wd")
  with pytest.raises(InputError, match="nowhere.*config.json: file does not exist"):
    load_model_state(tmp_path / "nowhere")
