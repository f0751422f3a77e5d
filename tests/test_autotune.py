"""kernels.cpu.autotune: the per-host choice between a native kernel and XLA's op,
with fake timings (nothing real is timed here)."""
import json
import os

import pytest

from echo_ode_jax.kernels.cpu import autotune, native

NATIVE, XLA = autotune.NATIVE, autotune.XLA


@pytest.fixture
def fresh(monkeypatch, tmp_path):
  """Measured choices (ECHO_ODE_NATIVE unset), an empty cache in tmp_path, and
  nothing remembered in this process (restored after)."""
  monkeypatch.delenv("ECHO_ODE_NATIVE", raising=False)
  monkeypatch.setenv("ECHO_ODE_NATIVE_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(autotune, "_table", None)
  monkeypatch.setattr(autotune, "_path", None)
  monkeypatch.setattr(autotune, "_warned", set())
  return tmp_path / "cache"


def _fake(seconds, calls):
  """(runs, timer): runs builds two named dummies, timer returns their fake time."""
  def runs():
    calls.append("runs")
    return {NATIVE: NATIVE, XLA: XLA}
  return runs, lambda fn: seconds[fn]


@pytest.mark.parametrize("seconds,want", [
    ({NATIVE: 0.001, XLA: 0.002}, NATIVE), ({NATIVE: 0.003, XLA: 0.002}, XLA),
    ({NATIVE: 0.002, XLA: 0.002}, XLA)])          # a tie keeps XLA's
def test_the_faster_one_is_chosen(fresh, seconds, want):
  calls = []
  assert autotune.choose("conv", "a", *_fake(seconds, calls)) == want
  assert calls == ["runs"]


def test_a_choice_is_measured_once_per_host_and_kept_on_disk(fresh):
  calls = []
  runs, timer = _fake({NATIVE: 1.0, XLA: 2.0}, calls)
  assert autotune.choose("conv", "a", runs, timer) == NATIVE
  assert autotune.choose("conv", "a", runs, timer) == NATIVE            # in memory
  assert autotune.choose("conv_wgrad", "a", *_fake({NATIVE: 2.0, XLA: 1.0}, calls)) == XLA
  assert len(calls) == 2
  path = autotune.cache_path()
  assert os.path.dirname(path) == str(fresh)
  assert json.load(open(path)) == {"conv a": NATIVE, "conv_wgrad a": XLA}
  autotune.reset()                     # as a new process: read back, not measured
  slower = _fake({NATIVE: 9.0, XLA: 1.0}, calls)
  assert autotune.choose("conv", "a", *slower) == NATIVE and len(calls) == 2
  assert autotune.choose("conv", "b", *slower) == XLA and len(calls) == 3   # a new shape


def test_another_cpu_measures_again(fresh, monkeypatch):
  calls = []
  assert autotune.choose("conv", "a", *_fake({NATIVE: 1.0, XLA: 2.0}, calls)) == NATIVE
  monkeypatch.setattr(autotune, "cpu_model", lambda: "Another CPU")
  autotune.reset()
  assert autotune.choose("conv", "a", *_fake({NATIVE: 2.0, XLA: 1.0}, calls)) == XLA
  assert len(calls) == 2 and len(os.listdir(fresh)) == 2


def test_cache_key_changes_with_cpu_cores_jaxlib_and_source():
  base = ("AMD EPYC 9654", 2, "0.5.0", "abc")
  keys = {autotune.cache_key(*base)}
  for i, other in enumerate(("Intel Xeon Platinum 8480", 4, "0.5.1", "abd")):
    keys.add(autotune.cache_key(*(base[:i] + (other,) + base[i + 1:])))
  assert len(keys) == 5
  assert autotune.cache_key(*base) == autotune.cache_key(*base)


def test_the_source_hash_is_in_the_cache_path(fresh, monkeypatch, tmp_path):
  first = autotune.cache_path()
  src = tmp_path / "k.cc"
  src.write_text("int a;\n")
  monkeypatch.setattr(native, "SOURCE", str(src))
  assert autotune.cache_path() != first


@pytest.mark.parametrize("mode,want", [("on", NATIVE), ("off", XLA), ("ON", NATIVE),
                                       ("0", XLA)])
def test_the_environment_decides_without_measuring(fresh, monkeypatch, mode, want):
  monkeypatch.setenv("ECHO_ODE_NATIVE", mode)
  def runs():
    raise AssertionError("measured")
  assert autotune.choose("conv", "a", runs, lambda fn: 0.0) == want
  assert not fresh.exists()


def test_an_unwritable_cache_only_costs_the_measurement(fresh, monkeypatch, caplog):
  fresh.parent.mkdir(exist_ok=True)
  fresh.write_text("a file where the directory should be")
  calls = []
  runs, timer = _fake({NATIVE: 1.0, XLA: 2.0}, calls)
  assert autotune.choose("conv", "a", runs, timer) == NATIVE
  assert autotune.choose("conv", "a", runs, timer) == NATIVE
  assert len(calls) == 1                                       # kept in memory
  assert "cannot save the kernel choices" in caplog.text


def test_a_corrupt_cache_file_is_ignored(fresh, caplog):
  path = autotune.cache_path()
  os.makedirs(os.path.dirname(path))
  with open(path, "w") as f:
    f.write("{not json")
  calls = []
  assert autotune.choose("conv", "a", *_fake({NATIVE: 2.0, XLA: 1.0}, calls)) == XLA
  assert calls == ["runs"] and json.load(open(path)) == {"conv a": XLA}


def test_measure_warms_up_then_takes_the_fastest_call():
  ticks = iter([0.0, 0.010, 1.0, 1.004, 2.0, 2.007])     # timed calls of 10, 4 and 7 ms
  calls = []
  t = autotune.measure(lambda: calls.append(1), repeats=3, clock=lambda: next(ticks))
  assert t == pytest.approx(0.004) and len(calls) == 4     # a warm-up call, then 3


def test_measure_times_a_slow_op_once():
  ticks = iter([0.0, 1.0])
  calls = []
  t = autotune.measure(lambda: calls.append(1), repeats=5, clock=lambda: next(ticks))
  assert t == 1.0 and len(calls) == 2


def test_forced_overrides_the_environment_within_its_block(fresh, monkeypatch):
  monkeypatch.setenv("ECHO_ODE_NATIVE", "on")
  def runs():
    raise AssertionError("measured")
  with native.forced("off"):
    assert native.mode() == "off" and not native.available()
    assert autotune.choose("conv", "a", runs, lambda fn: 0.0) == XLA
  assert native.mode() == "on"
  monkeypatch.setenv("ECHO_ODE_NATIVE", "off")
  with native.forced("on"):
    assert autotune.choose("conv", "a", runs, lambda fn: 0.0) == NATIVE
  with pytest.raises(ValueError, match="forced"):
    with native.forced("maybe"):
      pass


@pytest.mark.parametrize("winner", [NATIVE, XLA])
def test_conv2d_and_norm_modulate_follow_the_measured_choice(fresh, monkeypatch, winner):
  """With measured choices (fake timings) the traced network calls the native
  kernels exactly when they won, and the choices land in the cache file."""
  import jax
  import jax.numpy as jnp
  from echo_ode_jax.kernels import conv2d, norm_modulate
  if jax.default_backend() != "cpu" or not native.available():
    pytest.skip("native kernels unavailable")
  fake = {NATIVE: 1.0, XLA: 2.0} if winner == NATIVE else {NATIVE: 2.0, XLA: 1.0}
  timed = []
  def timer(fn):                 # which candidate fn is: the order runs() lists them
    timed.append(fn)
    return fake[NATIVE if len(timed) % 2 else XLA]
  monkeypatch.setattr(autotune, "measure", timer)
  x, k = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
  gb = jnp.ones((2, 8, 8, 8))
  f = lambda x, k: jnp.sum(norm_modulate(conv2d(x, k), gb))
  jaxpr = str(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, k))
  assert ("ffi_call" in jaxpr) == (winner == NATIVE)
  table = json.load(open(autotune.cache_path()))
  assert {name.split()[0] for name in table} == {"conv", "conv_wgrad", "norm_modulate"}
  assert set(table.values()) == {winner}
