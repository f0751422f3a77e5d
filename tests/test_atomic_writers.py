"""The HDF5 writers (segmenter predictions, synthetic data, the demo's ED/ES
training file) are atomic: a failure in the middle of a write, or a full disk,
leaves the output as it was (absent, or its previous bytes) and no temporary
file beside it."""
import errno
import os

import pytest

from echo_ode_jax import demos, tables
from echo_ode_jax.data import synthetic
from echo_ode_jax.errors import InputError, OutputError
from echo_ode_jax.segmenters import predict
from echo_ode_jax.segmenters.train import ModelState, TrainConfig, build_model, create_state

OLD = b"previous output"


def _fail_on_call(monkeypatch, module, name, n):
  """Makes module.name raise RuntimeError on its n-th call (1-based)."""
  real = getattr(module, name)
  calls = []

  def wrapped(*a, **kw):
    calls.append(1)
    if len(calls) == n:
      raise RuntimeError("interrupted")
    return real(*a, **kw)
  monkeypatch.setattr(module, name, wrapped)
  return calls


def _no_space(monkeypatch):
  def pwrite(*a):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  monkeypatch.setattr(os, "pwrite", pwrite)


def _check_untouched(folder, out, expect_files, existed):
  assert sorted(os.listdir(folder)) == sorted(expect_files)
  if existed:
    assert out.read_bytes() == OLD
  else:
    assert not out.exists()


# The writers that build their sequences with synthetic.make_sequence: (output
# name, write(path, n)).
SYNTHETIC_WRITERS = {
    "synthetic.make_dataset": ("synth.h5", lambda path, n: synthetic.make_dataset(
        path, n, size=32, num_frames=3, progress=False)),
    "demos._write_edes_train": ("train_edes.h5", lambda path, n: demos._write_edes_train(
        str(path), n, 32, 3, 0)),
}


def test_label_file_full_disk_and_stale_file(tmp_path, monkeypatch):
  """label_file: a full disk leaves no file; an existing file of the same
  sequences is kept, one of other sequences is refused in one line."""
  data = tmp_path / "data.h5"
  synthetic.make_dataset(data, 2, size=32, num_frames=3, progress=False)
  out = tmp_path / "gt.h5"
  with monkeypatch.context() as m:
    _no_space(m)
    with pytest.raises(OutputError, match="gt.h5: cannot write: no space left"):
      tables.label_file(str(data), str(out))
  _check_untouched(tmp_path, out, ["data.h5"], False)
  tables.label_file(str(data), str(out))
  stamp = out.stat().st_mtime_ns
  assert tables.label_file(str(data), str(out)) == str(out) and out.stat().st_mtime_ns == stamp
  other = tmp_path / "other.h5"
  synthetic.make_dataset(other, 3, size=32, num_frames=3, progress=False)
  with pytest.raises(InputError) as e:
    tables.label_file(str(other), str(out))
  assert "gt.h5" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("existed", [False, True])
@pytest.mark.parametrize("writer", sorted(SYNTHETIC_WRITERS))
def test_synthetic_writers_interrupted(tmp_path, monkeypatch, writer, existed):
  name, write = SYNTHETIC_WRITERS[writer]
  out = tmp_path / name
  if existed:
    out.write_bytes(OLD)
  calls = _fail_on_call(monkeypatch, synthetic, "make_sequence", 2)
  with pytest.raises(RuntimeError, match="interrupted"):
    write(out, 3)
  assert len(calls) == 2   # the first sequence was written before the failure
  _check_untouched(tmp_path, out, [name] if existed else [], existed)


@pytest.mark.parametrize("writer", sorted(SYNTHETIC_WRITERS))
def test_synthetic_writers_full_disk(tmp_path, monkeypatch, writer):
  name, write = SYNTHETIC_WRITERS[writer]
  out = tmp_path / name
  _no_space(monkeypatch)
  with pytest.raises(OutputError, match=f"{name}: cannot write: no space left"):
    write(out, 2)
  _check_untouched(tmp_path, out, [], False)


@pytest.fixture(scope="module")
def untrained_model():
  """An initialised (untrained) tiny U-Net at size 32."""
  cfg = TrainConfig(model="unet", model_kwargs={"widths": [4, 8]}, size=32)
  state = create_state(cfg, 0)
  return ModelState(build_model(cfg), {"params": state.params,
                                       "batch_stats": state.batch_stats}, cfg)


@pytest.mark.parametrize("existed", [False, True])
def test_write_predictions_interrupted(tmp_path, monkeypatch, untrained_model, existed):
  data = tmp_path / "data.h5"
  synthetic.make_dataset(data, 3, size=32, num_frames=3, progress=False)
  out = tmp_path / "pred.h5"
  if existed:
    out.write_bytes(OLD)
  calls = _fail_on_call(monkeypatch, predict, "predict_frames", 2)
  with pytest.raises(RuntimeError, match="interrupted"):
    predict.write_predictions(untrained_model, data, out)
  assert len(calls) == 2
  _check_untouched(tmp_path, out, ["data.h5"] + (["pred.h5"] if existed else []), existed)


def test_write_predictions_full_disk(tmp_path, monkeypatch, untrained_model):
  data = tmp_path / "data.h5"
  synthetic.make_dataset(data, 2, size=32, num_frames=3, progress=False)
  out = tmp_path / "pred.h5"
  _no_space(monkeypatch)
  with pytest.raises(OutputError, match="pred.h5: cannot write: no space left"):
    predict.write_predictions(untrained_model, data, out)
  _check_untouched(tmp_path, out, ["data.h5"], False)
  # Nothing went wrong with the writer itself: it works again with space.
  monkeypatch.undo()
  assert predict.write_predictions(untrained_model, data, out) == ["synth0000/4CH",
                                                                   "synth0001/4CH"]
  assert sorted(os.listdir(tmp_path)) == ["data.h5", "pred.h5"]
