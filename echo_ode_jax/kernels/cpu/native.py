"""Native CPU kernels (XLA FFI custom calls): the stride-1 float32 conv (forward
pass, and the weight gradient as cache-blocked GEMMs over the taps) and SPADE's
instance norm, modulation and activation fused into one pass forward and two
backward; the source is ``conv_norm_modulate.cc`` next to this file.

Built on first use with the host's C++ compiler (``$CXX``, else
``c++``/``g++``/``clang++``; ``-O3 -march=native``) against the FFI headers
jaxlib ships, into ``$ECHO_ODE_NATIVE_CACHE`` (default
``~/.cache/echo_ode_jax/native``): ``-march=native`` builds for the host that
runs it, so it cannot be a wheel built at install time. The library's name
carries a hash of the source, the flags, the compiler's and jaxlib's versions
and the CPU's feature flags, so a cache shared between hosts never loads a
build for another CPU. ``ECHO_ODE_NATIVE=off`` disables the kernels
(:func:`available` is then False). Which operations use them is decided by
:mod:`echo_ode_jax.kernels._backend`.
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Iterator

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jaxtyping import Array, Float

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "conv_norm_modulate.cc")
TARGET = "echo_ode_conv_wgrad_f32"
TARGET_FWD = "echo_ode_conv_fwd_f32"
TARGET_NORM_MOD = "echo_ode_norm_modulate_f32"
TARGET_NORM_MOD_BWD = "echo_ode_norm_modulate_bwd_f32"
MAX_TAPS = 64           # the forward kernel's limit on kh * kw (kMaxTaps in the source)
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
BUILD_TIMEOUT_S = 300   # a stuck compiler makes the kernel unavailable, not the import hang
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "echo_ode_jax", "native")

_lock = threading.Lock()
_state: dict = {}        # "ok": bool, "why": str, "path": str (after the first load attempt)


def _compiler() -> str | None:
  for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
    if name and shutil.which(name):
      return shutil.which(name)
  return None


def _cpu_flags() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith(("flags", "Features")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cache_dir() -> str:
  """$ECHO_ODE_NATIVE_CACHE, else DEFAULT_CACHE: the builds and the measured choices."""
  return os.environ.get("ECHO_ODE_NATIVE_CACHE") or DEFAULT_CACHE


def source_hash() -> str:
  """sha256 of SOURCE (hex)."""
  with open(SOURCE, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def library_path(cxx: str) -> str:
  """Where the build of SOURCE for this compiler, jaxlib and CPU lives."""
  version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                           check=False).stdout
  key = hashlib.sha256(source_hash().encode())
  for part in (" ".join(FLAGS), version, jaxlib.__version__, _cpu_flags(), platform.machine()):
    key.update(part.encode())
  return os.path.join(cache_dir(), f"conv_norm_modulate_{key.hexdigest()[:16]}.so")


def _build(cxx: str, path: str) -> None:
  """Compiles SOURCE to `path` (a temporary file renamed into place)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
  os.close(fd)
  try:
    cmd = [cxx, *FLAGS, "-isystem", jax.ffi.include_dir(), SOURCE, "-o", tmp]
    try:
      run = subprocess.run(cmd, capture_output=True, text=True, check=False,
                           timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
      raise RuntimeError(f"{os.path.basename(cxx)} took over {BUILD_TIMEOUT_S} s on "
                         f"{SOURCE}") from e
    if run.returncode != 0:
      lines = run.stderr.strip().splitlines() or ["(no output)"]
      first = next((l for l in lines if "error" in l), lines[-1])   # g++ ends on "terminated"
      raise RuntimeError(f"{os.path.basename(cxx)} failed on {SOURCE}: {first.strip()}")
    # mkstemp made it 0600 (the linker adds only execute bits): make a shared
    # cache readable by other users, as the umask allows.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o755 & ~umask)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


MODE_ENV = "ECHO_ODE_NATIVE"   # "off": XLA only; "on": native wherever supported; else measured
_OFF = ("off", "0", "false", "no")
_ON = ("on", "1", "true", "yes")


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar("echo_ode_native_mode",
                                                                  default=None)


def mode() -> str:
  """The mode, "off", "on" or "auto": the one :func:`forced` set in this thread,
  else $ECHO_ODE_NATIVE ("auto" when unset or any other value)."""
  v = _forced.get() or os.environ.get(MODE_ENV, "auto").strip().lower()
  return "off" if v in _OFF else "on" if v in _ON else "auto"


@contextlib.contextmanager
def forced(value: str) -> Iterator[None]:
  """Within the block (this thread), :func:`mode` is `value` ("on", "off" or
  "auto"), whatever $ECHO_ODE_NATIVE says."""
  if value not in ("on", "off", "auto"):
    raise ValueError(f"forced: mode must be 'on', 'off' or 'auto', got {value!r}")
  token = _forced.set(value)
  try:
    yield
  finally:
    _forced.reset(token)


def _load() -> None:
  cxx = _compiler()
  if cxx is None:
    _state.update(ok=False, why="no C++ compiler found ($CXX, c++, g++, clang++)")
    return
  path = library_path(cxx)
  try:
    if not os.path.exists(path):
      logging.info("kernels: compiling %s (once per host and jaxlib version)", SOURCE)
      _build(cxx, path)
    lib = ctypes.CDLL(path)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.EchoOdeConvWgrad), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_FWD, jax.ffi.pycapsule(lib.EchoOdeConvFwd), platform="cpu")
    jax.ffi.register_ffi_target(TARGET_NORM_MOD, jax.ffi.pycapsule(lib.EchoOdeNormModFwd),
                                platform="cpu")
    jax.ffi.register_ffi_target(TARGET_NORM_MOD_BWD, jax.ffi.pycapsule(lib.EchoOdeNormModBwd),
                                platform="cpu")
  except (OSError, RuntimeError, AttributeError) as e:
    _state.update(ok=False, why=str(e))
    return
  _state.update(ok=True, why="", path=path)


def available() -> bool:
  """Whether the native kernel is built and registered (builds it on first call).

  False without a C++ compiler, with ``ECHO_ODE_NATIVE=off`` or when the
  build fails; :func:`why_unavailable` says which, and a failed build is
  logged once as a warning.
  """
  if mode() == "off":
    return False
  with _lock:
    if not _state:
      _load()
      if not _state["ok"]:
        logging.warning("kernels: native CPU kernels unavailable (%s); XLA's ops are used",
                        _state["why"])
    return _state["ok"]


def why_unavailable() -> str:
  """'' when :func:`available`, else the reason."""
  if mode() == "off":
    return f"{MODE_ENV}=off" if _forced.get() is None else "forced off"
  return "" if available() else _state["why"]


def conv_shape_ok(x_shape, kernel_shape, pads) -> bool:
  """Whether :func:`conv` computes a stride-1 conv of these shapes and
  ((top, bottom), (left, right)) zero padding: padding >= 0, matching input
  channels, a non-empty output and at most MAX_TAPS kernel taps."""
  (pt, pb), (pl, pr) = pads
  kh, kw, ci, _ = kernel_shape
  ho, wo = x_shape[1] + pt + pb - kh + 1, x_shape[2] + pl + pr - kw + 1
  return (min(pt, pb, pl, pr) >= 0 and x_shape[-1] == ci and ho >= 1 and wo >= 1
          and kh * kw <= MAX_TAPS)


def conv_weight_grad(x: Float[Array, "N H W Ci"], g: Float[Array, "N Ho Wo Co"],
                     kernel_hw: tuple[int, int], pads) -> Float[Array, "kh kw Ci Co"]:
  """dL/dW of a stride-1 NHWC x HWIO float32 conv from its output cotangent g.

  pads: ((top, bottom), (left, right)) zero padding of x, each >= 0 (as
  ``lax.conv_general_dilated``'s explicit padding). CPU only; raises
  RuntimeError when the kernel is not :func:`available`.
  """
  if not available():
    raise RuntimeError(f"kernels: native conv weight gradient unavailable: {why_unavailable()}")
  (pt, pb), (pl, pr) = pads
  kh, kw = kernel_hw
  n, h, w, ci = x.shape
  ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1
  if min(pt, pb, pl, pr) < 0 or g.shape != (n, ho, wo, g.shape[-1]):
    raise ValueError(f"conv_weight_grad: x {x.shape}, g {g.shape}, kernel {kernel_hw} and "
                     f"pads {pads} do not describe a stride-1 conv")
  out = jax.ShapeDtypeStruct((kh, kw, ci, g.shape[-1]), jnp.float32)
  call = jax.ffi.ffi_call(TARGET, out, vmap_method="sequential")
  return call(x.astype(jnp.float32), g.astype(jnp.float32), pt=np.int64(pt), pl=np.int64(pl))


def conv(x: Float[Array, "N H W Ci"], kernel: Float[Array, "kh kw Ci Co"],
         pads) -> Float[Array, "N Ho Wo Co"]:
  """A stride-1 NHWC x HWIO float32 convolution with zero padding
  pads = ((top, bottom), (left, right)), each >= 0 (as
  ``lax.conv_general_dilated`` computes it). CPU only; raises RuntimeError
  when the kernel is not :func:`available`."""
  if not available():
    raise RuntimeError(f"kernels: native conv kernel unavailable: {why_unavailable()}")
  (pt, pb), (pl, pr) = pads
  kh, kw, _, co = kernel.shape
  n, h, w, _ = x.shape
  ho, wo = h + pt + pb - kh + 1, w + pl + pr - kw + 1
  if not conv_shape_ok(x.shape, kernel.shape, pads):
    raise ValueError(f"conv: x {x.shape}, kernel {kernel.shape} and pads {pads} do not "
                     f"describe a stride-1 conv with non-negative padding, a non-empty "
                     f"output and at most {MAX_TAPS} kernel taps")
  out = jax.ShapeDtypeStruct((n, ho, wo, co), jnp.float32)
  call = jax.ffi.ffi_call(TARGET_FWD, out, vmap_method="sequential")
  return call(x.astype(jnp.float32), kernel.astype(jnp.float32), pt=np.int64(pt),
              pl=np.int64(pl))



def norm_modulate(x: Float[Array, "N H W C"], gb: Float[Array, "N H W 2C"],
                  bias: Float[Array, "2C"], eps: float, slope: float
                  ) -> tuple[Float[Array, "N H W C"], Float[Array, "N C"], Float[Array, "N C"]]:
  """(leaky_relu(instance_norm(x) (1 + gamma) + beta, slope), mean, rstd) with
  (gamma, beta) = the channel halves of gb + bias, float32; mean and
  rstd = 1 / sqrt(var + eps) are per image and channel over (H, W). CPU only;
  raises RuntimeError when the kernels are not :func:`available`."""
  if not available():
    raise RuntimeError(f"kernels: native kernels unavailable: {why_unavailable()}")
  n, h, w, c = x.shape if x.ndim == 4 else (0, 0, 0, 0)
  if x.size == 0 or gb.shape != (n, h, w, 2 * c) or bias.shape != (2 * c,):
    raise ValueError(f"norm_modulate: x {x.shape}, gb {gb.shape} and bias {bias.shape} must "
                     f"be a non-empty (N, H, W, C), (N, H, W, 2C) and (2C,)")
  outs = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
          jax.ShapeDtypeStruct((n, c), jnp.float32), jax.ShapeDtypeStruct((n, c), jnp.float32))
  call = jax.ffi.ffi_call(TARGET_NORM_MOD, outs, vmap_method="sequential")
  f32 = lambda a: a.astype(jnp.float32)
  return call(f32(x), f32(gb), f32(bias), eps=np.float32(eps), slope=np.float32(slope))


def norm_modulate_bwd(d: Float[Array, "N H W C"], x: Float[Array, "N H W C"],
                      gb: Float[Array, "N H W 2C"], bias: Float[Array, "2C"],
                      out: Float[Array, "N H W C"], mean: Float[Array, "N C"],
                      rstd: Float[Array, "N C"], slope: float
                      ) -> tuple[Float[Array, "N H W C"], Float[Array, "N H W 2C"],
                                 Float[Array, "N 2C"]]:
  """(dx, dgb, per-image sums of dgb over (H, W)) of :func:`norm_modulate` from
  its output cotangent d, its inputs, its output and its (mean, rstd)."""
  if not available():
    raise RuntimeError(f"kernels: native kernels unavailable: {why_unavailable()}")
  outs = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(gb.shape, jnp.float32),
          jax.ShapeDtypeStruct((x.shape[0], gb.shape[-1]), jnp.float32))
  call = jax.ffi.ffi_call(TARGET_NORM_MOD_BWD, outs, vmap_method="sequential")
  f32 = lambda a: a.astype(jnp.float32)
  return call(f32(d), f32(x), f32(gb), f32(bias), f32(out), f32(mean), f32(rstd),
              slope=np.float32(slope))
